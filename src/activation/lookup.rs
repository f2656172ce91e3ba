//! Finding where an identity lives, and the shell that keeps a node's [`Activations`] in step
//! with its membership.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::registry::{Activations, Fence};
use crate::ClusterEvent;
use crate::placement::PartitionManager;
use crate::provider::ClusterProviderContext;
use crate::runtime::TaskHandle;

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

fn lock(a: &Mutex<Activations>) -> std::sync::MutexGuard<'_, Activations> {
    a.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `activations` in step with the node of `ctx`: on every topology change, identities
/// this node no longer owns drain for `drain`; when the node loses its membership everything
/// is deactivated at once; a restored membership takes the new incarnation; drained
/// identities are deactivated at their deadline. `deactivated` is told each identity let go.
pub fn drive(
    ctx: &ClusterProviderContext,
    activations: Arc<Mutex<Activations>>,
    drain: Duration,
    deactivated: impl Fn(&str, &str) + Send + Sync + 'static,
) -> TaskHandle {
    let mut events = ctx.events.subscribe();
    let (clock, pm) = (ctx.clock.clone(), ctx.partition_manager.clone());
    ctx.clock.clone().spawn(
        "activation",
        Box::pin(async move {
            loop {
                let deadline = lock(&activations).next_deadline();
                let wait = deadline.map(|d| d.saturating_duration_since(clock.now()));
                let event = tokio::select! {
                    biased;
                    e = events.recv() => Some(e),
                    _ = clock.sleep(wait.unwrap_or(Duration::from_secs(3600))) => None,
                };
                let now = clock.now();
                let mut a = lock(&activations);
                let gone = match event {
                    Some(Ok(ClusterEvent::MembershipLost { .. })) => a.lost(),
                    Some(Ok(ClusterEvent::MembershipRestored { member, .. })) => {
                        a.restored(member.id);
                        Vec::new()
                    }
                    Some(Ok(ClusterEvent::TopologyChanged { .. }))
                    | Some(Err(crate::SubscriptionError::Lagged { .. })) => {
                        a.reconcile(
                            |kind, identity| pm.peek_owner(kind, identity).map(|m| m.id.clone()),
                            now,
                            drain,
                        );
                        a.tick(now)
                    }
                    Some(Ok(_)) => Vec::new(),
                    Some(Err(crate::SubscriptionError::Closed)) => return,
                    None => a.tick(now),
                };
                drop(a);
                for (kind, identity) in gone {
                    deactivated(&kind, &identity);
                }
            }
        }),
    )
}
