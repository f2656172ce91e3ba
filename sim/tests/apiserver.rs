//! The simulated API server node answers calls over the simulated network promptly and streams
//! watches.
#![cfg(madsim)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use madsim::runtime::Handle;
use madsim::time::{Instant, sleep};
use shoal::kubernetes::api::{KubeApi, Lease, ObjectMeta, WatchEvent};
use shoal::kubernetes::memory::MemoryApiServer;
use shoal_sim::control::apiserver::{APISERVER_PORT, KubeDoor, SimKubeApi};
use shoal_sim::oracle::{Bounds, Oracles};
use shoal_sim::record::Recorder;

fn lease(name: &str) -> Lease {
    Lease {
        meta: ObjectMeta {
            name: name.into(),
            namespace: "ns".into(),
            ..ObjectMeta::default()
        },
        holder_identity: Some(name.into()),
        ..Lease::default()
    }
}

#[madsim::test]
async fn calls_are_answered_promptly_and_watches_stream() {
    let h = Handle::current();
    let rec = Recorder::new(false);
    let oracles = Oracles::new(
        rec.clone(),
        Bounds::kubernetes(&shoal_sim::cluster::kubernetes_config(None), false),
    );
    let door = KubeDoor::new(MemoryApiServer::default(), oracles, rec);
    let d = door.clone();
    h.create_node()
        .name("apiserver")
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))
        .init(move || d.clone().serve())
        .build();
    let client = h
        .create_node()
        .name("c")
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)))
        .build();
    client
        .spawn(async move {
            sleep(Duration::from_millis(100)).await;
            let api = SimKubeApi::new(SocketAddr::from(([10, 0, 0, 1], APISERVER_PORT)));
            let mut l = api.create_lease(lease("a")).await.unwrap();
            let list = api
                .list_leases("ns", &Default::default(), &Default::default())
                .await
                .unwrap();
            let mut watch = api
                .watch_leases("ns", &Default::default(), &list.resource_version)
                .await
                .unwrap();
            let mut slowest = Duration::ZERO;
            for k in 0..200 {
                let start = Instant::now();
                l.renew_time_micros = Some(k);
                l = api.replace_lease(l).await.unwrap();
                slowest = slowest.max(start.elapsed());
                let e = watch.next_event().await;
                assert!(matches!(e, Some(Ok(WatchEvent::Modified(_)))), "{e:?}");
            }
            assert!(
                slowest < Duration::from_millis(500),
                "slowest call {slowest:?}"
            );
        })
        .await
        .unwrap();
}

trait NextEvent {
    async fn next_event(
        &mut self,
    ) -> Option<Result<WatchEvent<Lease>, shoal::kubernetes::api::ApiError>>;
}

impl NextEvent for shoal::kubernetes::api::WatchStream<Lease> {
    async fn next_event(
        &mut self,
    ) -> Option<Result<WatchEvent<Lease>, shoal::kubernetes::api::ApiError>> {
        futures::StreamExt::next(self).await
    }
}
