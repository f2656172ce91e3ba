//! Typed topology events and the bounded stream they are published on.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::cluster::{ClusterTopology, Member, MemberId};
use crate::metrics::EventMetrics;
use crate::placement::RebalanceReport;
use crate::provider::LossReason;

/// A change of membership as seen by one node, carrying the version it happened at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopologyEvent {
    /// The full topology at a version (published for every applied version, so a subscriber
    /// that lagged can resynchronise from the next one).
    Snapshot {
        /// The topology.
        topology: Arc<ClusterTopology>,
    },
    /// A member appeared (or its description changed) at `version`.
    Registered {
        /// Cluster name.
        cluster: String,
        /// The member, with its kinds.
        member: Member,
        /// Topology version it appeared in.
        version: u64,
    },
    /// A member disappeared at `version`.
    Deregistered {
        /// Cluster name.
        cluster: String,
        /// The member as last seen, with its kinds.
        member: Member,
        /// Topology version it disappeared in.
        version: u64,
    },
}

impl TopologyEvent {
    /// The topology version the event belongs to.
    pub fn version(&self) -> u64 {
        match self {
            TopologyEvent::Snapshot { topology } => topology.version(),
            TopologyEvent::Registered { version, .. }
            | TopologyEvent::Deregistered { version, .. } => *version,
        }
    }
}

/// Everything a node's cluster layer tells the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A membership event.
    Topology(TopologyEvent),
    /// A newer topology was applied; the report says which remembered identities moved and
    /// holds the membership diff. Published after the [`TopologyEvent`]s of that version.
    TopologyChanged {
        /// The topology now applied.
        topology: Arc<ClusterTopology>,
        /// What changed.
        report: Arc<RebalanceReport>,
    },
    /// This node's own registration is gone, or may be about to go: the backend may already
    /// have removed it, so peers may take over its identities at any moment. Stop serving the
    /// identities this node owns. The same contract for every provider (see
    /// `crate::provider::lease`).
    MembershipLost {
        /// Cluster name.
        cluster: String,
        /// The incarnation that lost its registration.
        member: MemberId,
        /// How the node found out.
        reason: LossReason,
        /// The topology version held when it found out.
        version: u64,
    },
    /// This node is registered again after a [`ClusterEvent::MembershipLost`]. When the backend
    /// had removed it, it re-joined as a new incarnation (`member.id != previous`): peers never
    /// see a member they saw removed come back.
    MembershipRestored {
        /// Cluster name.
        cluster: String,
        /// This node as now registered.
        member: Member,
        /// The incarnation that was lost.
        previous: MemberId,
        /// The topology version held when it was restored.
        version: u64,
    },
}

impl ClusterEvent {
    /// The topology version the event belongs to.
    pub fn version(&self) -> u64 {
        match self {
            ClusterEvent::Topology(e) => e.version(),
            ClusterEvent::TopologyChanged { topology, .. } => topology.version(),
            ClusterEvent::MembershipLost { version, .. }
            | ClusterEvent::MembershipRestored { version, .. } => *version,
        }
    }
}

/// Why [`Subscription::recv`] returned no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// The subscriber fell behind and `missed` events were dropped for it; the next `recv`
    /// continues with the oldest event still held. A `Snapshot` follows every change, so the
    /// subscriber can resynchronise.
    #[error("subscriber lagged behind and missed {missed} events")]
    Lagged {
        /// Events missed.
        missed: u64,
    },
    /// The stream was dropped; no further events will come.
    #[error("event stream closed")]
    Closed,
}

/// A bounded, multi-subscriber stream of [`ClusterEvent`]s.
///
/// Publishing never blocks and never fails: each subscriber has a window of `capacity` events,
/// and one that falls further behind is told how many it missed (it cannot stall a provider, and
/// it is not silently skipped).
#[derive(Clone, Debug)]
pub struct EventStream {
    tx: broadcast::Sender<ClusterEvent>,
    metrics: EventMetrics,
}

impl EventStream {
    /// Default number of events a subscriber may fall behind before it lags.
    pub const DEFAULT_CAPACITY: usize = 256;

    /// A stream holding at most `capacity` (at least 1) unread events per subscriber.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            tx,
            metrics: EventMetrics::default(),
        }
    }

    /// Publishes `event` to every current subscriber without waiting.
    pub fn publish(&self, event: ClusterEvent) {
        self.metrics.published.inc();
        // An error only means nobody is subscribed, which is fine.
        let _ = self.tx.send(event);
    }

    /// A new subscriber that sees events published from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            metrics: self.metrics.clone(),
        }
    }

    /// Metrics handles.
    pub fn metrics(&self) -> &EventMetrics {
        &self.metrics
    }
}

impl Default for EventStream {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

/// One subscriber's cursor on an [`EventStream`].
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<ClusterEvent>,
    metrics: EventMetrics,
}

impl Subscription {
    /// Waits for the next event.
    pub async fn recv(&mut self) -> Result<ClusterEvent, SubscriptionError> {
        let mut r = self.rx.recv().await;
        while matches!(r, Err(broadcast::error::RecvError::Lagged(_)))
            && crate::runtime::sim::flaw("lag-unreported")
        {
            r = self.rx.recv().await;
        }
        self.map(r.map_err(|e| match e {
            broadcast::error::RecvError::Lagged(n) => SubscriptionError::Lagged { missed: n },
            broadcast::error::RecvError::Closed => SubscriptionError::Closed,
        }))
    }

    /// The next event if one is waiting, `Ok(None)` if none is.
    pub fn try_recv(&mut self) -> Result<Option<ClusterEvent>, SubscriptionError> {
        match self.rx.try_recv() {
            Ok(e) => Ok(Some(e)),
            Err(broadcast::error::TryRecvError::Empty) => Ok(None),
            Err(broadcast::error::TryRecvError::Lagged(_))
                if crate::runtime::sim::flaw("lag-unreported") =>
            {
                self.try_recv()
            }
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                self.map(Err(SubscriptionError::Lagged { missed: n }))
            }
            Err(broadcast::error::TryRecvError::Closed) => Err(SubscriptionError::Closed),
        }
    }

    fn map<T>(&self, r: Result<T, SubscriptionError>) -> Result<T, SubscriptionError> {
        if let Err(SubscriptionError::Lagged { missed }) = &r {
            self.metrics.lagged.inc_by(*missed);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(version: u64) -> ClusterEvent {
        ClusterEvent::Topology(TopologyEvent::Snapshot {
            topology: Arc::new(ClusterTopology::new("c", version, Vec::<Member>::new()).unwrap()),
        })
    }

    #[tokio::test]
    async fn slow_subscriber_is_told_it_lagged_and_does_not_block_publisher() {
        let stream = EventStream::new(4);
        let mut slow = stream.subscribe();
        let mut fast = stream.subscribe();
        for v in 1..=10 {
            stream.publish(snapshot(v));
            assert_eq!(fast.recv().await.unwrap().version(), v);
        }
        assert_eq!(
            slow.recv().await,
            Err(SubscriptionError::Lagged { missed: 6 })
        );
        for v in 7..=10 {
            assert_eq!(slow.recv().await.unwrap().version(), v);
        }
        assert_eq!(slow.try_recv(), Ok(None));
        assert_eq!(stream.metrics().lagged.get(), 6);
        assert_eq!(stream.metrics().published.get(), 10);
    }

    #[tokio::test]
    async fn publishing_without_subscribers_is_fine_and_close_is_reported() {
        let stream = EventStream::new(1);
        stream.publish(snapshot(1));
        let mut sub = stream.subscribe();
        drop(stream);
        assert_eq!(sub.recv().await, Err(SubscriptionError::Closed));
    }
}
