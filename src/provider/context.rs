//! What a provider is given to work with.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cluster::{ClusterTopology, Member, MemberId, MemberLimits, ModelError, check_text};
use crate::events::{ClusterEvent, EventStream, TopologyEvent};
use crate::placement::{PartitionConfig, PartitionManager, PlacementError, RebalanceReport};
use std::time::Duration;

use crate::runtime::{SharedClock, timeout};

use super::lease::MembershipWindow;

/// Longest cluster name, in bytes.
pub const MAX_CLUSTER_NAME_LEN: usize = 128;

/// Everything a provider needs from the node it serves: who the node is, where to send
/// topologies (the partition manager and the event stream) and how to reach time and tasks.
#[derive(Clone, Debug)]
pub struct ClusterProviderContext {
    /// The cluster to join or watch.
    pub cluster_name: String,
    /// This node's description: a fresh incarnation id, its address, kinds, zone and metadata.
    pub member: Member,
    /// This node's partition manager; providers feed it through [`Self::apply_topology`].
    pub partition_manager: Arc<PartitionManager>,
    /// This node's clock and task spawner.
    pub clock: SharedClock,
    /// Where topology events are published.
    pub events: EventStream,
    /// Until when this node holds its membership, as its provider reckons it (see
    /// [`MembershipWindow`]).
    pub standing: MembershipWindow,
    /// Members registered but left out of the topology (see [`WithheldMembers`]).
    pub withheld: WithheldMembers,
}

/// Members the provider knows still hold a registration but leaves out of the topology
/// (Kubernetes: Pods whose endpoints are not serving, while their Lease is alive). They take no
/// new identities, but their processes may still hold activations: an activation host asks them
/// too before activating. Empty for providers that list every registered member.
#[derive(Clone, Debug, Default)]
pub struct WithheldMembers(Arc<std::sync::Mutex<Arc<Vec<Member>>>>);

impl WithheldMembers {
    /// The members now.
    pub fn get(&self) -> Arc<Vec<Member>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces them.
    pub fn set(&self, members: Vec<Member>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(members);
    }
}

impl ClusterProviderContext {
    /// A context for a node at `address` hosting `kinds`, with a freshly generated incarnation
    /// id, a new partition manager and a new event stream.
    pub fn new<I, S>(
        cluster_name: impl Into<String>,
        address: impl Into<String>,
        kinds: I,
        clock: SharedClock,
    ) -> Result<Self, ModelError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let cluster_name = cluster_name.into();
        check_text("cluster name", &cluster_name, MAX_CLUSTER_NAME_LEN)?;
        let address = address.into();
        let id = MemberId::generate(&address, clock.as_ref());
        let member = Member::new(id, address, kinds);
        member.validate(&MemberLimits::default())?;
        Ok(Self {
            partition_manager: Arc::new(PartitionManager::new(
                cluster_name.clone(),
                PartitionConfig::default(),
            )),
            cluster_name,
            member,
            clock,
            events: EventStream::default(),
            standing: MembershipWindow::default(),
            withheld: WithheldMembers::default(),
        })
    }

    /// Sets the zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.member.zone = Some(zone.into());
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: BTreeMap<String, String>) -> Self {
        self.member.metadata = metadata;
        self
    }

    /// Replaces the partition manager with one using `config`.
    pub fn with_partition_config(mut self, config: PartitionConfig) -> Self {
        self.partition_manager = Arc::new(PartitionManager::new(self.cluster_name.clone(), config));
        self
    }

    /// Replaces the event stream.
    pub fn with_events(mut self, events: EventStream) -> Self {
        self.events = events;
        self
    }

    /// Uses `id` instead of the generated incarnation id.
    pub fn with_member_id(mut self, id: MemberId) -> Self {
        self.member.id = id;
        self
    }

    /// Waits until `ready` holds, looking again after every event this node publishes and at
    /// least every 100 ms (a first empty snapshot publishes nothing); `false` after `within`.
    /// Providers use it to return from a start or an update only once the node's own view
    /// shows the result.
    pub async fn wait_until(&self, within: Duration, ready: impl Fn() -> bool) -> bool {
        // Subscribed before the first look, so a change in between is not missed.
        let mut events = self.events.subscribe();
        let clock = self.clock.clone();
        timeout(clock.as_ref(), within, async {
            while !ready() {
                tokio::select! {
                    biased;
                    _ = events.recv() => {}
                    _ = clock.sleep(Duration::from_millis(100)) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// Applies a topology received from the provider's source: the partition manager takes it if
    /// it is newer, then the membership events of that version and a `TopologyChanged` are
    /// published, in that order. A stale topology changes nothing and is returned as an error.
    pub fn apply_topology(
        &self,
        topology: Arc<ClusterTopology>,
    ) -> Result<Arc<RebalanceReport>, PlacementError> {
        let report = Arc::new(self.partition_manager.update_topology(topology.clone())?);
        let cluster = &self.cluster_name;
        let version = topology.version();
        for member in &report.diff.left {
            self.events
                .publish(ClusterEvent::Topology(TopologyEvent::Deregistered {
                    cluster: cluster.clone(),
                    member: member.clone(),
                    version,
                }));
        }
        let registered = report
            .diff
            .joined
            .iter()
            .chain(report.diff.changed.iter().map(|c| &c.after));
        for member in registered {
            self.events
                .publish(ClusterEvent::Topology(TopologyEvent::Registered {
                    cluster: cluster.clone(),
                    member: member.clone(),
                    version,
                }));
        }
        self.events
            .publish(ClusterEvent::Topology(TopologyEvent::Snapshot {
                topology: topology.clone(),
            }));
        self.events.publish(ClusterEvent::TopologyChanged {
            topology,
            report: report.clone(),
        });
        tracing::info!(
            cluster = %cluster,
            member = %self.member.id,
            from_version = report.from_version,
            to_version = version,
            joined = report.diff.joined.len(),
            left = report.diff.left.len(),
            changed = report.diff.changed.len(),
            moved = report.moved.len(),
            "topology applied"
        );
        Ok(report)
    }
}
