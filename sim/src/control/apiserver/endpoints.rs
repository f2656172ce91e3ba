//! The simulated endpoints controller: keeps the EndpointSlices of the members' headless
//! Service in step with their Pods' states, as the harness reports them (serving once the
//! process runs, terminating during a graceful shutdown, not ready after a crash or freeze).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use shoal::kubernetes::api::{
    Endpoint as SliceEndpoint, EndpointSlice, ObjectMeta, ObjectReference, SERVICE_NAME_LABEL,
};
use shoal::kubernetes::memory::MemoryApiServer;

use crate::record::Recorder;

/// The headless Service the simulated members are gated by.
pub const SERVICE: &str = "sim-members";

/// What the endpoints controller says of one Pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    /// Running and passing its readiness probe.
    Serving,
    /// Being deleted (a graceful shutdown): still serving, but terminating.
    Terminating,
    /// Running but failing its readiness probe (crashed, frozen).
    NotReady,
}

/// The endpoints controller of the simulated cluster: keeps the EndpointSlices of [`SERVICE`]
/// (two slices per hundred members, a Pod in one of them: the real controller's slices hold at
/// most 100 endpoints, so a Pod's change is not a copy of every endpoint to every watcher) in step with the Pods' states, as the harness reports
/// them. A Pod's state changes only with a newer generation (a restart bumps it), so a late
/// "not ready" for a crashed Pod cannot overwrite its restarted successor.
#[derive(Debug)]
pub struct EndpointController {
    store: MemoryApiServer,
    /// By Pod: generation, address, state, and the controller's change counter at its last
    /// change.
    pods: Mutex<std::collections::BTreeMap<String, (u64, IpAddr, PodState, u64)>>,
    changes: std::sync::atomic::AtomicU64,
    zones: bool,
    rec: Recorder,
}

/// The zone the simulated cluster puts Pod `pod` in (`m0` in `zone-a`, `m1` in `zone-b`,
/// `m2` in `zone-c`, `m3` in `zone-a`, ...), reported on its endpoint.
pub fn pod_zone(pod: &str) -> String {
    let n: usize = pod
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0);
    format!("zone-{}", ["a", "b", "c"][n % 3])
}

impl EndpointController {
    /// A controller writing into `store`; with `zones`, each endpoint carries its Pod's zone
    /// ([`pod_zone`]).
    pub fn new(store: MemoryApiServer, rec: Recorder, zones: bool) -> Arc<Self> {
        Arc::new(Self {
            store,
            pods: Mutex::default(),
            changes: std::sync::atomic::AtomicU64::new(0),
            zones,
            rec,
        })
    }

    /// The Pod's generation, address, state and change counter, if it ever started.
    pub fn state(&self, pod: &str) -> Option<(u64, IpAddr, PodState, u64)> {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
            .copied()
    }

    /// The Pod's current generation (0 if unknown).
    pub fn generation(&self, pod: &str) -> u64 {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
            .map_or(0, |(g, ..)| *g)
    }

    /// A (re)started Pod at `ip`: a new generation, serving.
    pub fn started(&self, pod: &str, ip: IpAddr) {
        let g = self.generation(pod) + 1;
        self.set(pod, ip, g, PodState::Serving);
    }

    /// The Pod's state, if it is still at generation `generation`; whether it changed.
    pub fn update(&self, pod: &str, generation: u64, state: PodState) -> bool {
        let Some(ip) = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
            .filter(|(g, ..)| *g == generation)
            .map(|(_, ip, ..)| *ip)
        else {
            return false;
        };
        self.set(pod, ip, generation, state)
    }

    fn set(&self, pod: &str, ip: IpAddr, generation: u64, state: PodState) -> bool {
        let slice = {
            let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            if pods
                .get(pod)
                .is_some_and(|(g, _, s, _)| *g == generation && *s == state)
            {
                return false;
            }
            let change = self
                .changes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            pods.insert(pod.to_string(), (generation, ip, state, change));
            // The Pod's slice, rebuilt from every Pod in it.
            let index = slice_of(pod);
            EndpointSlice {
                meta: ObjectMeta {
                    name: format!("{SERVICE}-{index}"),
                    namespace: "default".into(),
                    labels: [(SERVICE_NAME_LABEL.to_string(), SERVICE.to_string())].into(),
                    ..ObjectMeta::default()
                },
                endpoints: pods
                    .iter()
                    .filter(|(p, _)| slice_of(p) == index)
                    .map(|(p, (_, ip, state, _))| SliceEndpoint {
                        addresses: vec![ip.to_string()],
                        ready: Some(*state == PodState::Serving),
                        serving: Some(*state != PodState::NotReady),
                        terminating: Some(*state == PodState::Terminating),
                        zone: self.zones.then(|| pod_zone(p)),
                        target_ref: Some(ObjectReference {
                            kind: "Pod".into(),
                            namespace: "default".into(),
                            name: p.clone(),
                            uid: format!("uid-{p}"),
                        }),
                    })
                    .collect(),
            }
        };
        self.rec.count(match state {
            PodState::Serving => "endpoints: serving",
            PodState::Terminating => "endpoints: terminating",
            PodState::NotReady => "endpoints: not ready",
        });
        self.store.put_endpoint_slice(slice);
        true
    }
}

/// The slice of Pod `pod` (`pod-m<i>`): two per block of a hundred members, by a checksum of
/// the name within the block.
fn slice_of(pod: &str) -> u64 {
    let block = pod
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap_or(0)
        / 100;
    block * 2 + pod.bytes().map(u64::from).sum::<u64>() % 2
}
