//! Finding where an identity lives.

use std::sync::Arc;

use async_trait::async_trait;

use super::registry::Fence;
use crate::placement::PartitionManager;

/// Where an identity is: the owner's address, and the fence a call to it must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// `host:port` of the owner.
    pub address: String,
    /// The topology (epoch, version) and owner incarnation the answer comes from.
    pub fence: Fence,
}

/// Finds the owner of an identity.
#[async_trait]
pub trait IdentityLookup: Send + Sync {
    /// The owner of `kind/identity` now, or `None` when no member hosts the kind.
    async fn get(&self, kind: &str, identity: &str) -> Option<Located>;
}

/// The lookup every node can answer alone: rendezvous placement over its own topology (the
/// same answer on every node that holds the same topology, see [`crate::placement`]).
#[derive(Debug, Clone)]
pub struct PlacementLookup {
    pm: Arc<PartitionManager>,
}

impl PlacementLookup {
    /// Looks up through `pm`.
    pub fn new(pm: Arc<PartitionManager>) -> Self {
        Self { pm }
    }
}

#[async_trait]
impl IdentityLookup for PlacementLookup {
    async fn get(&self, kind: &str, identity: &str) -> Option<Located> {
        let t = self.pm.topology();
        let owner = self.pm.owner(kind, identity)?;
        Some(Located {
            address: owner.address.clone(),
            fence: Fence {
                epoch: t.epoch(),
                version: t.version(),
                owner: owner.id.clone(),
            },
        })
    }
}
