//! The Kubernetes API server as a simulated control plane: the library's `MemoryApiServer` on a
//! node of its own behind [`door::KubeDoor`], with the endpoints controller
//! ([`endpoints::EndpointController`]) that gates members by a headless Service in some seeds.
//!
//! Faults: a crash keeps the store (its state is in etcd) and ends every watch; a freeze (no
//! write is accepted, nobody can renew); renewals of a member lost at the door; every watch
//! reset. Its load: requests by verb and resource, watch events (bookmarks included), objects
//! returned by lists, and bytes estimated as the real API server's JSON with one
//! `managedFields` entry per object ([`door::lease_bytes`]).

pub mod door;
pub mod endpoints;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::time::sleep;
use shoal::kubernetes::api::ObjectReference;
use shoal::kubernetes::memory::MemoryApiServer;
use shoal::kubernetes::{
    Heartbeats, KubernetesProvider, KubernetesProviderConfig, KubernetesProviderMetrics,
};
use shoal::{ClusterProvider, ClusterTopology};

pub use self::door::{APISERVER_PORT, KubeDoor, SimKubeApi};
pub use self::endpoints::{EndpointController, PodState, SERVICE, pod_zone};
use super::{ADDRESS, ControlNode, ControlPlane, Env, MemberRef, NodeInfo};
use crate::knobs::Knobs;
use crate::load::{LoadBudget, LoadCounts};
use crate::oracle::{Bounds, Oracles};
use crate::record::Recorder;

/// Events the simulated API server keeps for watches to resume from, per member: about 10 s
/// of renewals (one Lease or one heartbeat per member every 2 s), so that a member cut off for
/// longer than a Lease duration or two gets `410 Gone` and relists, at any size (a fixed count
/// would be 10 s at 5 members and a fifth of a second at 300, every resume a relist). The real
/// watch cache keeps about 75 s. At least [`HISTORY_MIN`].
pub const HISTORY_PER_MEMBER: usize = 6;

/// The fewest events kept (32: about 10 s of renewals at 5 members).
pub const HISTORY_MIN: usize = 32;

/// The history for a cluster of `members`.
pub fn history(members: usize) -> usize {
    (members * HISTORY_PER_MEMBER).max(HISTORY_MIN)
}

/// How often the API server sends a bookmark on every watch.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(2);

/// The Kubernetes provider settings simulations use: a 6 s Lease (the registry's TTL) renewed
/// every 2 s; lists in pages of 40; each member's Lease owned by its Pod.
pub fn config(pod: Option<&str>, knobs: &Knobs) -> KubernetesProviderConfig {
    let mut c = KubernetesProviderConfig::new("default");
    c.lease_duration = Duration::from_secs(6);
    c.request_timeout = knobs.request_timeout.unwrap_or(Duration::from_secs(1));
    c.watch_idle_timeout = Duration::from_secs(10);
    c.startup_timeout = Duration::from_secs(10);
    // Pages of 40: a list at scale (100 members and more) takes several, as 500 would at
    // thousands on a real cluster.
    c.list_page_size = Some(40);
    if let Some((shards, monitors)) = knobs.k8s_heartbeats {
        c.heartbeats = Heartbeats::Sharded { shards, monitors };
    }
    if knobs.k8s_everyone {
        c.heartbeats = Heartbeats::Everyone;
    }
    c.pod = pod.map(|name| ObjectReference {
        kind: "Pod".into(),
        namespace: "default".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    });
    c
}

/// The Pod name of the simulated node `node`.
pub fn pod_name(node: &str) -> String {
    format!("pod-{node}")
}

/// The bounds of the Kubernetes provider with the simulation's settings.
pub fn bounds(knobs: &Knobs) -> Bounds {
    Bounds::kubernetes(&config(None, knobs), knobs.buggify)
}

/// The Kubernetes provider's load budget.
///
/// Every member watching every Lease ([`Heartbeats::Everyone`]): every member renews its Lease
/// every renew interval, and every renewal is a MODIFIED event to every member's Lease watch
/// (a per-member term: the design's O(N²) fan-out, stated); a bookmark per watch every 2 s;
/// each watch ends after 60 s and resumes; a watcher that resumes past the event history
/// (about 10 s) lists again.
///
/// Sharded heartbeats: no per-member term. Each member renews its heartbeat every renew
/// interval and each renewal reaches the k monitors of its shard (k/r events per member); the
/// S·k shard watches are spread over the members (all S on each member of a small cluster),
/// each with its bookmarks and a resume (a list) a minute; a membership change is a record
/// event to every member.
pub fn budget(knobs: &Knobs) -> LoadBudget {
    let c = config(None, knobs);
    let renew = c.renew_interval().as_secs_f64();
    // Two watches per node (Leases, EndpointSlices), each with bookmarks and a resume a minute.
    let watches = 2.0;
    let bookmarks = 1.0 / BOOKMARK_EVERY.as_secs_f64();
    // A cluster migrating between settings carries both kinds of traffic: the larger budget.
    let heartbeats = if knobs.k8s_migrate.is_some() {
        Heartbeats::Everyone
    } else {
        c.heartbeats
    };
    let (per_member, heartbeat_events, spread_watches) = match heartbeats {
        Heartbeats::Everyone => (1.0 / renew, 0.0, (0.0, 0.0)),
        Heartbeats::Sharded { shards, monitors } => (
            0.0,
            f64::from(monitors) / renew,
            (f64::from(shards * monitors), f64::from(shards)),
        ),
    };
    LoadBudget {
        requests_per_node_per_s: 1.0 / renew + watches / 60.0 + 1.0 / renew,
        requests_per_change: 4.0,
        requests_per_reconnect: 8.0,
        events_per_watcher_per_s: watches * bookmarks + heartbeat_events,
        events_per_watcher_per_member_per_s: per_member,
        events_per_change_per_watcher: 3.0,
        events_per_reconnect: 6.0,
        lists_per_node_per_s: watches / 60.0,
        lists_per_change: 1.0,
        lists_per_change_per_watcher: 0.0,
        lists_per_reconnect: 3.0,
        spread_watches,
        per_spread_watch_per_s: (1.0 / 60.0, bookmarks, 1.0 / 60.0),
        // A reconnect reopens each: what it costs one of the two watches every node holds.
        per_spread_watch_reconnect: (4.0, 3.0, 1.5),
        slack: if knobs.buggify { 4.0 } else { 2.0 },
        why: match heartbeats {
            Heartbeats::Everyone => {
                "Kubernetes: a renewal per member per renew interval reaching every member's watch, a bookmark per watch every 2 s, a resume (at scale a relist) per watch a minute"
            }
            Heartbeats::Sharded { .. } => {
                "Kubernetes, sharded heartbeats: a heartbeat per member per renew interval reaching its shard's k monitors, a record event per membership change to every member, a bookmark per watch every 2 s, a resume (at scale a relist) per watch a minute"
            }
        },
    }
}

/// The API server on its node, its door and its endpoints controller.
#[derive(Debug)]
pub struct ApiServerPlane {
    node: ControlNode,
    door: Arc<KubeDoor>,
    endpoints: Option<Arc<EndpointController>>,
    oracles: Arc<Oracles>,
    bounds: Bounds,
    knobs: Knobs,
    providers: Mutex<Vec<KubernetesProviderMetrics>>,
    /// Nodes whose first process started (a cluster migrating between heartbeat settings).
    started: Mutex<std::collections::BTreeSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ApiServerPlane {
    /// Starts the API server node; its store lives outside the node, so it survives restarts.
    pub fn start(env: Env) -> Arc<dyn ControlPlane> {
        // A short event history: a watcher cut off for longer gets 410 Gone when it resumes
        // and must relist.
        let store = MemoryApiServer::new(history(env.members));
        let door = KubeDoor::new(store, env.oracles.clone(), env.rec.clone());
        door.out_of_contract.store(
            env.knobs.out_of_contract,
            std::sync::atomic::Ordering::SeqCst,
        );
        // One run: the store's Leases persist across API-server restarts.
        env.oracles.registry_started(1);
        let (d, rec) = (door.clone(), env.rec.clone());
        let node = env
            .handle
            .create_node()
            .name("apiserver")
            .ip(ADDRESS)
            .init(move || {
                let (door, rec) = (d.clone(), rec.clone());
                async move {
                    rec.trace("apiserver", "started");
                    let store = door.store().clone();
                    madsim::task::spawn(async move {
                        loop {
                            sleep(BOOKMARK_EVERY).await;
                            store.bookmark();
                        }
                    });
                    door.serve().await;
                }
            })
            .build();
        Arc::new(ApiServerPlane {
            node: ControlNode::new(env.handle.clone(), node),
            endpoints: env.knobs.k8s_service.then(|| {
                EndpointController::new(door.store().clone(), env.rec.clone(), env.knobs.k8s_zones)
            }),
            door,
            oracles: env.oracles,
            bounds: bounds(&env.knobs),
            knobs: env.knobs.clone(),
            providers: Mutex::default(),
            started: Mutex::default(),
        })
    }
}

impl ControlPlane for ApiServerPlane {
    fn name(&self) -> &'static str {
        "apiserver"
    }

    fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// A dead member's Lease is deleted a duration (plus up to half of one, if the first
    /// cleaner is gone too) after its last renewal; a member that lost its Lease creates a new
    /// one at its next renewal; a restarted process starts within a few seconds; watches
    /// reopen within a renew interval; slow clocks (25%) stretch all of it.
    fn liveness_bound(&self) -> Duration {
        let c = config(None, &self.knobs);
        (c.lease_duration * 2 + c.renew_interval() + c.watch_idle_timeout) * 4 / 3
            + Duration::from_secs(5 + 10 + 4)
    }

    fn node(&self) -> Option<madsim::task::NodeId> {
        Some(self.node.id())
    }

    fn provider(&self, node: &NodeInfo) -> Arc<dyn ClusterProvider> {
        let api = SimKubeApi::new(SocketAddr::new(ADDRESS, APISERVER_PORT));
        let pod = pod_name(&node.name);
        let mut config = config(Some(&pod), &self.knobs);
        if let Some(migration) = self.knobs.k8s_migrate {
            let first = lock(&self.started).insert(node.name.clone());
            let sharded = migration.sharded(first);
            if !sharded {
                config.heartbeats = Heartbeats::Everyone;
            }
            self.door.set_sharded(node.ip, sharded);
        }
        if let Some(e) = &self.endpoints {
            // The Pod's readiness probe passes as soon as its process runs (it does not wait
            // for the provider to start).
            config.service = Some(SERVICE.to_string());
            if !node.is_client {
                // A client's Pod is not selected by the members' Service.
                e.started(&pod, node.ip);
                if self.knobs.k8s_zones {
                    self.door.set_zone(node.ip, endpoints::pod_zone(&pod));
                }
            }
        }
        let p = KubernetesProvider::new(config, Arc::new(api));
        lock(&self.providers).push(p.metrics().clone());
        Arc::new(p)
    }

    fn listed(&self) -> Option<(u64, Arc<ClusterTopology>)> {
        if self.node.is_paused() {
            return None;
        }
        // The API server's store: Leases survive its restarts (one run).
        Some((1, self.door.topology()))
    }

    fn disturbed(&self) -> bool {
        self.node.is_down() || self.node.is_paused()
    }

    fn crash(&self, store: super::Store) -> Option<u64> {
        // The store is etcd's: it survives; every watch ends with the process. Its etcd
        // losing or restoring its data is not modelled.
        (store == super::Store::Kept).then(|| self.node.kill())
    }

    fn restart_after(&self, crash: u64) {
        if self.node.is_latest(crash)
            && let Some(down) = self.node.revive()
        {
            self.oracles.apiserver_silent(down);
        }
    }

    fn pause(&self) -> bool {
        self.node.pause()
    }

    fn resume(&self) {
        if let Some(d) = self.node.resume() {
            self.oracles.apiserver_silent(d);
        }
    }

    fn delays(&self) -> Option<&crate::control::delays::Delays> {
        Some(&self.door.delays)
    }

    fn lose_renewals(&self, m: &MemberRef, lost: bool) -> bool {
        self.door.set_renewal_loss(m.ip, lost);
        true
    }

    fn reset_streams(&self) -> bool {
        self.door.reset_streams();
        true
    }

    fn shed_reads(&self, retry_after: Option<Duration>) -> bool {
        self.door.shed_reads(retry_after);
        true
    }

    fn heal(&self) {
        self.door.clear_renewal_loss();
        self.door.delays.clear();
        self.door.shed_reads(None);
        self.resume();
        if let Some(down) = self.node.revive() {
            self.oracles.apiserver_silent(down);
        }
    }

    fn load(&self) -> LoadCounts {
        self.door.meter.counts()
    }

    fn budget(&self) -> LoadBudget {
        budget(&self.knobs)
    }

    fn record_path_counts(&self, rec: &Recorder) {
        for m in lock(&self.providers).iter() {
            rec.count_n("kubernetes: renew failures", m.renew_failures.get());
            rec.count_n("kubernetes: relists after 410", m.relists.get());
            rec.count_n("kubernetes: watches reopened", m.watch_reopens.get());
            rec.count_n("kubernetes: expired leases deleted", m.leases_cleaned.get());
            rec.count_n(
                "kubernetes: monitored shards changed",
                m.monitor_changes.get(),
            );
            rec.count_n(
                "kubernetes: heartbeats found missing",
                m.heartbeats_missing.get(),
            );
            rec.count_n("kubernetes: records touched", m.record_touches.get());
            rec.count_n("kubernetes: membership lost", m.membership_lost.get());
            rec.count_n(
                "kubernetes: membership restored",
                m.membership_restored.get(),
            );
            rec.count_n(
                "kubernetes: description updates",
                m.description_updates.get(),
            );
            rec.count_n("kubernetes: requests shed (429)", m.throttled.get());
        }
    }

    fn endpoints(&self) -> Option<Arc<EndpointController>> {
        self.endpoints.clone()
    }

    fn teardown(&self) {
        self.node.teardown();
        lock(&self.providers).clear();
    }
}
