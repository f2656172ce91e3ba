//! Deliberately broken providers and registries, to prove every checker fires.
//!
//! A flaw wraps the real provider of member `m0` (or configures the registry): the wrapped
//! provider feeds a private partition manager and event stream, and a relay forwards what it
//! learns to the node's real context — faithfully, or with the flaw.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shoal::provider::{
    ClusterProvider, ClusterProviderContext, PartitionManagerHandle, ProviderError,
};
use shoal::runtime::TaskHandle;
use shoal::{
    ClusterEvent, ClusterTopology, EventStream, MemberId, PartitionConfig, RebalanceReport,
};

/// A deliberate defect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Flaw {
    /// No defect.
    #[default]
    None,
    /// `m0` re-publishes the previous topology after each new one (applies stale versions).
    StaleReplay,
    /// `m0` corrupts the address of one member in every topology it applies (same version,
    /// different placement).
    CorruptPlacement,
    /// `m0`'s watch silently stops delivering after 20 simulated seconds.
    FreezeWatch,
    /// The registry never sweeps expired registrations.
    NeverExpire,
}

impl Flaw {
    /// Whether member `m0`'s provider is wrapped.
    pub fn wraps_provider(self) -> bool {
        matches!(
            self,
            Flaw::StaleReplay | Flaw::CorruptPlacement | Flaw::FreezeWatch
        )
    }
}

/// A provider with a [`Flaw`].
pub struct FlawedProvider {
    inner: Box<dyn ClusterProvider>,
    flaw: Flaw,
    relay: Mutex<Option<TaskHandle>>,
}

impl FlawedProvider {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn ClusterProvider>, flaw: Flaw) -> Self {
        Self {
            inner,
            flaw,
            relay: Mutex::new(None),
        }
    }

    fn start_relay(&self, outer: &ClusterProviderContext) -> ClusterProviderContext {
        let inner_ctx = outer
            .clone()
            .with_partition_config(PartitionConfig::default())
            .with_events(EventStream::default());
        let mut events = inner_ctx.events.subscribe();
        let outer = outer.clone();
        let flaw = self.flaw;
        let started = outer.clock.now();
        let task = outer.clock.clone().spawn(
            "flaw-relay",
            Box::pin(async move {
                let mut previous: Option<Arc<ClusterTopology>> = None;
                while let Ok(event) = events.recv().await {
                    let ClusterEvent::TopologyChanged { topology, .. } = event else {
                        continue;
                    };
                    match flaw {
                        Flaw::StaleReplay => {
                            let _ = outer.apply_topology(topology.clone());
                            if let Some(prev) = previous.replace(topology) {
                                outer.events.publish(ClusterEvent::TopologyChanged {
                                    topology: prev,
                                    report: Arc::new(RebalanceReport::default()),
                                });
                            }
                        }
                        Flaw::CorruptPlacement => {
                            let _ = outer.apply_topology(Arc::new(corrupt(&topology)));
                        }
                        Flaw::FreezeWatch => {
                            if outer.clock.now().duration_since(started) < Duration::from_secs(20) {
                                let _ = outer.apply_topology(topology);
                            }
                        }
                        Flaw::None | Flaw::NeverExpire => {
                            let _ = outer.apply_topology(topology);
                        }
                    }
                }
            }),
        );
        *self.relay.lock().unwrap() = Some(task);
        inner_ctx
    }
}

/// The same version with one member's placement key (address) changed.
fn corrupt(t: &ClusterTopology) -> ClusterTopology {
    let mut members = t.members().to_vec();
    if let Some(m) = members.first_mut() {
        Arc::make_mut(m).address = "192.0.2.1:1".into();
    }
    ClusterTopology::new(t.cluster_name(), t.version(), members).expect("same ids")
}

#[async_trait]
impl ClusterProvider for FlawedProvider {
    async fn start_member(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        let inner_ctx = self.start_relay(&ctx);
        self.inner.start_member(inner_ctx).await
    }

    async fn start_client(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        let inner_ctx = self.start_relay(&ctx);
        self.inner.start_client(inner_ctx).await
    }

    async fn shutdown(&self, graceful: bool) -> Result<(), ProviderError> {
        if let Some(t) = self.relay.lock().unwrap().take() {
            t.abort();
        }
        self.inner.shutdown(graceful).await
    }

    async fn resolve_partition_manager(
        &self,
        member: &MemberId,
    ) -> Result<PartitionManagerHandle, ProviderError> {
        self.inner.resolve_partition_manager(member).await
    }
}

impl Drop for FlawedProvider {
    fn drop(&mut self) {
        if let Some(t) = self.relay.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}
