//! The registry and members as real processes over 127.0.0.1 (normal build only): failover,
//! graceful leave, registry restart, bad input, TLS and unreachable registries.
#![cfg(not(madsim))]

mod common;

use std::time::{Duration, Instant};

use common::process::*;
use shoal::registry::pb;
use shoal::registry::pb::registry_client::RegistryClient;
use tonic::Code;

const FAST: &[&str] = &[
    "--ttl",
    "1500ms",
    "--heartbeat-interval",
    "500ms",
    "--sweep-interval",
    "250ms",
    "--startup-grace",
    "0s",
    "--progress-interval",
    "1s",
];

/// A join of member `id` at `address` hosting kind `k` into cluster `c`, as an independent client
/// writes it from the .proto.
fn member_join(id: &str, address: &str, secret: &str) -> pb::JoinRequest {
    pb::JoinRequest {
        cluster: "c".into(),
        member: Some(pb::Member {
            id: id.into(),
            address: address.into(),
            kinds: vec!["k".into()],
            ..Default::default()
        }),
        role: pb::Role::Member as i32,
        incarnation_secret: secret.into(),
        ..Default::default()
    }
}

fn url(addr: &str) -> String {
    format!("http://{addr}")
}

/// Starts members `m1..=mn` of cluster `c` on the registry at `registry_url` and waits until each
/// sees all `n`; returns them with the snapshot line each saw.
fn full_cluster(registry_url: &str, n: usize) -> (Vec<Proc>, Vec<serde_json::Value>) {
    let members: Vec<Proc> = (1..=n)
        .map(|i| start_member(&format!("m{i}"), registry_url, "c", &[]))
        .collect();
    let seen = members
        .iter()
        .map(|m| m.wait_snapshot(&format!("{n} members"), 20, |v| member_count(v) == n))
        .collect();
    (members, seen)
}

#[test]
fn kill9_member_expires_and_graceful_stop_is_seen_at_once() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = FAST.to_vec();
    args.extend(["--metrics-listen", &metrics]);
    let (_registry, addr) = start_registry("127.0.0.1:0", &args);
    let u = url(&addr);
    let m1 = start_member("m1", &u, "c", &[]);
    let mut m2 = start_member("m2", &u, "c", &[]);
    let mut m3 = start_member("m3", &u, "c", &[]);
    for m in [&m1, &m2, &m3] {
        m.wait_snapshot("3 members", 20, |v| member_count(v) == 3);
    }
    let victim = m3.last_json().unwrap();
    let victim_addr = victim["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["address"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(victim_addr.len(), 3);

    let killed = Instant::now();
    m3.kill9();
    for m in [&m1, &m2] {
        let v = m.wait_snapshot("the killed member to be removed", 20, |v| {
            member_count(v) == 2
        });
        assert_eq!(v["left"].as_array().unwrap().len(), 1);
    }
    eprintln!(
        "kill -9 seen by both survivors after {:?} (ttl 1.5 s, sweep 0.25 s)",
        killed.elapsed()
    );
    assert_eq!(metric(&metrics, "shoal_registry_expiries_total"), Some(1.0));

    let status = m2.sigterm();
    assert!(status.success(), "graceful stop exits 0: {status:?}");
    m1.wait_snapshot("the stopped member to be removed", 20, |v| {
        member_count(v) == 1
    });
    // Seen through a leave, not a TTL expiry: no second expiry was counted.
    assert_eq!(metric(&metrics, "shoal_registry_leaves_total"), Some(1.0));
    assert_eq!(metric(&metrics, "shoal_registry_expiries_total"), Some(1.0));
    assert_eq!(metric(&metrics, "shoal_registry_members"), Some(1.0));
}

#[test]
fn registry_restart_brings_every_live_member_back() {
    let mut args = FAST.to_vec();
    args[7] = "1s"; // startup grace: members re-join before watchers get a snapshot
    let (mut registry, addr) = start_registry("127.0.0.1:0", &args);
    let u = url(&addr);
    let (members, seen) = full_cluster(&u, 3);
    let before = seen
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .max()
        .unwrap();
    registry.kill9();
    let (_registry, addr2) = start_registry(&addr, &args);
    assert_eq!(addr, addr2);
    let restarted = Instant::now();
    for m in &members {
        m.wait_snapshot("3 members after the restart", 20, |v| {
            member_count(v) == 3 && v["version"].as_u64().unwrap() > before
        });
    }
    eprintln!(
        "all members back after {:?} (heartbeat 0.5 s)",
        restarted.elapsed()
    );
    let (ok, out, err) = topology(&u, "c", &[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(member_count(&v), 3);
    // No member ever saw a version go backwards.
    for m in &members {
        let versions: Vec<u64> = m
            .json_lines("snapshot")
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{}: {versions:?}",
            m.name
        );
    }
}

/// A member frozen for longer than the TTL (SIGSTOP: a VM pause, a long GC) is expired by the
/// registry; when it wakes it says so (membership-lost), re-joins as a new incarnation
/// (membership-restored with a new id), and its peers never see the old id come back.
#[test]
fn a_member_frozen_past_its_ttl_knows_it_lost_membership_and_returns_as_a_new_incarnation() {
    let (_registry, addr) = start_registry("127.0.0.1:0", FAST);
    let u = url(&addr);
    let frozen = start_member("frozen", &u, "c", &[]);
    let peer = start_member("peer", &u, "c", &[]);
    for m in [&frozen, &peer] {
        m.wait_snapshot("2 members", 20, |v| member_count(v) == 2);
    }
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = ids(&peer.last_json().unwrap());
    let signal = |sig: &str| frozen.signal(sig);
    signal("-STOP");
    peer.wait_snapshot("the frozen member expired", 20, |v| member_count(v) == 1);
    let survivor = ids(&peer.last_json().unwrap());
    let old_id = before
        .iter()
        .find(|i| !survivor.contains(i))
        .unwrap()
        .clone();
    signal("-CONT");
    let restored = frozen.wait_line("membership restored", 20, |l| {
        l.contains("\"membership-restored\"")
    });
    let restored: serde_json::Value = serde_json::from_str(&restored).unwrap();
    assert_eq!(restored["previous"], old_id.as_str());
    assert_ne!(restored["member"], old_id.as_str(), "a new incarnation");
    let lost = frozen.json_lines("membership-lost");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0]["member"], old_id.as_str());
    let new_id = restored["member"].as_str().unwrap().to_string();
    peer.wait_snapshot("the new incarnation", 20, |v| {
        ids(v).contains(&new_id) && member_count(v) == 2
    });
    let seen_after_expiry = peer
        .json_lines("snapshot")
        .iter()
        .skip_while(|v| !ids(v).contains(&old_id))
        .skip_while(|v| ids(v).contains(&old_id))
        .any(|v| ids(v).contains(&old_id));
    assert!(
        !seen_after_expiry,
        "{old_id} came back after it was removed"
    );
}

/// A registry frozen for twice the TTL (SIGSTOP: a VM pause) does not expire its members when it
/// wakes: the stall is added to every lease. The members noticed they could not renew and said
/// so; they are back under the same ids, and no watcher saw anyone leave.
#[test]
fn a_stalled_registry_extends_leases_instead_of_expiring_everyone() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = FAST.to_vec();
    args.extend(["--metrics-listen", &metrics]);
    let (registry, addr) = start_registry("127.0.0.1:0", &args);
    let u = url(&addr);
    let (members, _) = full_cluster(&u, 2);
    let signal = |sig: &str| registry.signal(sig);
    signal("-STOP");
    for m in &members {
        m.wait_line("membership lost while the registry is frozen", 20, |l| {
            l.contains("\"membership-lost\"")
        });
    }
    std::thread::sleep(Duration::from_millis(1_500));
    signal("-CONT");
    for m in &members {
        let line = m.wait_line("membership restored", 20, |l| {
            l.contains("\"membership-restored\"")
        });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v["member"], v["previous"],
            "{}: same incarnation: {v}",
            m.name
        );
    }
    std::thread::sleep(Duration::from_millis(1_000));
    for m in &members {
        let counts: Vec<usize> = m.json_lines("snapshot").iter().map(member_count).collect();
        assert!(
            counts.iter().skip_while(|&&n| n < 2).all(|&n| n == 2),
            "{}: a member was removed after the stall: {counts:?}",
            m.name
        );
    }
    assert_eq!(metric(&metrics, "shoal_registry_expiries_total"), Some(0.0));
    assert_eq!(metric(&metrics, "shoal_registry_stalls_total"), Some(1.0));
}

/// A registry restarted on a host whose clock is ten minutes behind issues lower versions in a
/// new epoch: members take its snapshot as a reset and keep following it (no freeze).
#[test]
fn registry_restarted_with_its_clock_behind_is_followed_not_ignored() {
    let mut args = FAST.to_vec();
    args[7] = "1s"; // startup grace: members re-join before watchers get a snapshot
    let (mut registry, addr) = start_registry("127.0.0.1:0", &args);
    let u = url(&addr);
    let (members, seen) = full_cluster(&u, 2);
    let last = seen.last().unwrap();
    let before = (
        last["epoch"].as_str().unwrap().to_string(),
        last["version"].as_u64().unwrap(),
    );
    registry.kill9();
    let (_registry, addr2) = start_registry_faketime("-10m", &addr, &args);
    assert_eq!(addr, addr2);
    let third = start_member("m3", &u, "c", &[]);
    for m in members.iter().chain([&third]) {
        let v = m.wait_snapshot("3 members from the restarted registry", 30, |v| {
            member_count(v) == 3
        });
        let (epoch, version) = (v["epoch"].as_str().unwrap(), v["version"].as_u64().unwrap());
        assert_ne!(epoch, before.0, "{}: a restart is a new epoch", m.name);
        assert!(
            version < before.1,
            "{}: the restarted registry's clock is behind, so its versions are lower ({version} >= {})",
            m.name,
            before.1
        );
    }
}

/// Member ids are owned: a join for a registered id without its incarnation secret is refused
/// (the victim keeps its address and token), a retry with the secret is harmless, and a new
/// incarnation at a registered address supersedes the old one in a single update.
#[tokio::test]
async fn nobody_can_take_over_a_member_id_and_a_new_incarnation_supersedes_its_address() {
    let (_registry, addr) = start_registry("127.0.0.1:0", FAST);
    let mut client = RegistryClient::connect(url(&addr)).await.unwrap();
    let join = member_join;
    let victim = client
        .join(join("victim", "127.0.0.1:7001", "s3cret"))
        .await
        .unwrap()
        .into_inner();
    let mut watch = client
        .watch(pb::WatchRequest {
            cluster: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap(); // the snapshot
    for secret in ["", "guess"] {
        let err = client
            .join(join("victim", "10.6.6.6:666", secret))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        assert!(err.message().contains("victim"), "{err:?}");
    }
    let resolved = client
        .resolve(pb::ResolveRequest {
            cluster: "c".into(),
            member_id: "victim".into(),
            cluster_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.member.unwrap().address, "127.0.0.1:7001");
    let hb = |token: String| pb::HeartbeatRequest {
        cluster: "c".into(),
        member_token: token,
    };
    assert!(
        client
            .heartbeat(hb(victim.member_token.clone()))
            .await
            .is_ok()
    );
    // A retried join of the same incarnation: a new token, nothing broadcast.
    let retried = client
        .join(join("victim", "127.0.0.1:7001", "s3cret"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.topology_version, victim.topology_version);
    // The process restarts at the same address as a new incarnation: one update.
    client
        .join(join("victim-2", "127.0.0.1:7001", "other"))
        .await
        .unwrap();
    let update = loop {
        match watch.message().await.unwrap().unwrap().event {
            Some(pb::watch_response::Event::Update(u)) => break u,
            Some(pb::watch_response::Event::Progress(_)) => continue,
            other => panic!("expected an update, got {other:?}"),
        }
    };
    assert_eq!(update.left, ["victim"]);
    assert_eq!(
        update
            .joined
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["victim-2"]
    );
    let err = client
        .heartbeat(hb(retried.member_token))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "the superseded registration is gone"
    );
    let err = client
        .join(join("victim", "127.0.0.1:7001", "s3cret"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "a removed id stays removed: {err:?}"
    );
}

/// A registered member changes its description in place (a join with its secret and
/// `update_only`): watchers get one update with the member in `changed`; an `update_only` join
/// of an id the registry does not hold is NOT_FOUND and registers nothing.
#[tokio::test]
async fn an_update_only_join_changes_a_description_in_place_and_never_registers_an_id() {
    let (_registry, addr) = start_registry("127.0.0.1:0", FAST);
    let mut client = RegistryClient::connect(url(&addr)).await.unwrap();
    let join = |zone: &str, update_only: bool| {
        let mut req = member_join("m1", "127.0.0.1:7001", "s3cret");
        if let Some(m) = req.member.as_mut() {
            m.zone = zone.into();
        }
        req.update_only = update_only;
        req
    };
    let err = client.join(join("", true)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("new id"), "{err:?}");
    let first = client.join(join("", false)).await.unwrap().into_inner();
    assert!(first.topology_version > 0);
    let mut watch = client
        .watch(pb::WatchRequest {
            cluster: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap(); // the snapshot
    let moved = client.join(join("z2", true)).await.unwrap().into_inner();
    assert!(moved.topology_version > first.topology_version);
    let update = loop {
        match watch.message().await.unwrap().unwrap().event {
            Some(pb::watch_response::Event::Update(u)) => break u,
            Some(pb::watch_response::Event::Progress(_)) => continue,
            other => panic!("expected an update, got {other:?}"),
        }
    };
    assert!(
        update.joined.is_empty() && update.left.is_empty(),
        "{update:?}"
    );
    assert_eq!(update.changed.len(), 1);
    assert_eq!(update.changed[0].zone, "z2");
    assert_eq!(update.version, moved.topology_version);
    // The new token holds the registration; the old one is void.
    let hb = |token: String| pb::HeartbeatRequest {
        cluster: "c".into(),
        member_token: token,
    };
    assert!(client.heartbeat(hb(moved.member_token)).await.is_ok());
    assert_eq!(
        client
            .heartbeat(hb(first.member_token))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

/// Under load a cluster's changes reach its watchers coalesced: a burst of joins arrives as a
/// few updates, each applying to the version before it, that add up to every join.
#[tokio::test]
async fn a_burst_of_joins_reaches_watchers_as_a_few_chained_updates() {
    let mut args = FAST.to_vec();
    args.extend(["--publish-interval", "200ms"]);
    let (_registry, addr) = start_registry("127.0.0.1:0", &args);
    let mut client = RegistryClient::connect(url(&addr)).await.unwrap();
    let join = |i: usize| {
        member_join(
            &format!("m{i}"),
            &format!("127.0.0.1:{}", 7000 + i),
            &format!("s{i}"),
        )
    };
    client.join(join(0)).await.unwrap();
    let mut watch = client
        .watch(pb::WatchRequest {
            cluster: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::watch_response::Event::Snapshot(first)) =
        watch.message().await.unwrap().unwrap().event
    else {
        panic!("a watch starts with a snapshot");
    };
    let mut version = first.version;
    let mut members: std::collections::BTreeSet<String> = ["m0".to_string()].into();
    const N: usize = 40;
    for i in 1..=N {
        client.join(join(i)).await.unwrap();
    }
    let mut updates = 0;
    while members.len() < N + 1 {
        match watch.message().await.unwrap().unwrap().event {
            Some(pb::watch_response::Event::Update(u)) => {
                assert_eq!(u.previous_version, version, "updates chain");
                version = u.version;
                members.extend(u.joined.into_iter().map(|m| m.id));
                updates += 1;
            }
            Some(pb::watch_response::Event::Progress(_)) => {}
            other => panic!("expected updates, got {other:?}"),
        }
    }
    // 40 joins over loopback take milliseconds; each publish interval sends one update.
    assert!(updates <= 10, "{N} joins arrived as {updates} updates");
    eprintln!("{N} joins arrived as {updates} updates");
}

/// One client cannot exhaust the registry: every global and per-cluster limit answers with
/// RESOURCE_EXHAUSTED (or INVALID_ARGUMENT for an oversized member) and a message naming it,
/// the operator's named cluster keeps working, and its watcher keeps receiving updates.
#[tokio::test]
async fn limits_hold_against_one_client_and_named_clusters_keep_working() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let args = [
        "--metrics-listen",
        &metrics,
        "--cluster",
        "named",
        "--max-clusters",
        "1",
        "--max-registrations",
        "4",
        "--max-watchers",
        "4",
        "--max-member-bytes",
        "2000",
        "--max-snapshot-bytes",
        "4000",
        "--max-message-bytes",
        "65536",
        "--startup-grace",
        "0s",
    ];
    let (_registry, addr) = start_registry("127.0.0.1:0", &args);
    let mut client = RegistryClient::connect(url(&addr)).await.unwrap();
    let watch = |cluster: &str| pb::WatchRequest {
        cluster: cluster.into(),
        ..Default::default()
    };
    let mut named = client.watch(watch("named")).await.unwrap().into_inner();
    named.message().await.unwrap().unwrap();
    let member = |cluster: &str, id: &str, port: u16, blob: usize| pb::JoinRequest {
        cluster: cluster.into(),
        member: Some(pb::Member {
            id: id.into(),
            address: format!("127.0.0.1:{port}"),
            kinds: vec!["k".into()],
            metadata: (0..blob.div_ceil(1_000))
                .map(|i| (format!("blob{i}"), "x".repeat(1_000.min(blob - i * 1_000))))
                .collect(),
            ..Default::default()
        }),
        role: pb::Role::Member as i32,
        incarnation_secret: format!("secret-{id}"),
        ..Default::default()
    };
    let refused =
        |r: Result<tonic::Response<pb::JoinResponse>, tonic::Status>, code, what: &str| {
            let err = r.unwrap_err();
            assert_eq!(err.code(), code, "{what}: {err:?}");
            assert!(err.message().contains(what), "{what}: {err:?}");
        };
    client.join(member("open1", "a", 1, 0)).await.unwrap();
    refused(
        client.join(member("open2", "b", 2, 0)).await,
        Code::ResourceExhausted,
        "clusters",
    );
    let err = client.watch(watch("open2")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    refused(
        client.join(member("named", "big", 3, 3_000)).await,
        Code::InvalidArgument,
        "bytes encoded",
    );
    client.join(member("named", "x", 4, 1_500)).await.unwrap();
    client.join(member("named", "y", 5, 1_500)).await.unwrap();
    refused(
        client.join(member("named", "z", 6, 1_500)).await,
        Code::ResourceExhausted,
        "snapshot limit",
    );
    let d = client
        .join(member("named", "d", 7, 0))
        .await
        .unwrap()
        .into_inner();
    refused(
        client.join(member("named", "e", 8, 0)).await,
        Code::ResourceExhausted,
        "registrations",
    );
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut w = client.watch(watch("named")).await.unwrap().into_inner();
        w.message().await.unwrap().unwrap();
        open.push(w);
    }
    let mut over = client.watch(watch("named")).await;
    if let Ok(stream) = &mut over {
        // Refusal may come as the stream's first message.
        over = stream
            .get_mut()
            .message()
            .await
            .map(|_| panic!("a fifth watcher was admitted"));
    }
    let err = over.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("watch streams"), "{err:?}");
    // The named cluster's first watcher still hears about changes: d's join, then its leave
    // (after the join was seen: a join and leave within one publish interval coalesce into
    // nothing).
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(pb::watch_response::Event::Update(u)) =
                named.message().await.unwrap().unwrap().event
                && u.joined.iter().any(|m| m.id == "d")
            {
                break;
            }
        }
    })
    .await
    .unwrap();
    client
        .leave(pb::LeaveRequest {
            cluster: "named".into(),
            member_token: d.member_token,
        })
        .await
        .unwrap();
    let left = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(pb::watch_response::Event::Update(u)) =
                named.message().await.unwrap().unwrap().event
                && u.left.iter().any(|id| id == "d")
            {
                break u.left;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(left, ["d"]);
    let limit = |name: &str| {
        metric(
            &metrics,
            &format!("shoal_registry_limit_rejections_total{{limit=\"{name}\"}}"),
        )
    };
    for name in [
        "max_clusters",
        "max_snapshot_bytes",
        "max_registrations",
        "max_watchers",
    ] {
        assert!(
            limit(name).unwrap_or(0.0) >= 1.0,
            "no rejection counted for {name}"
        );
    }
}

#[tokio::test]
async fn bad_requests_are_rejected_while_a_watcher_keeps_receiving_updates() {
    let mut args = FAST.to_vec();
    args.extend([
        "--cluster-token",
        "secure=t0ken",
        "--max-kinds",
        "4",
        "--max-message-bytes",
        "4096",
    ]);
    let (_registry, addr) = start_registry("127.0.0.1:0", &args);
    let mut client = RegistryClient::connect(url(&addr)).await.unwrap();
    let mut watch = client
        .watch(pb::WatchRequest {
            cluster: "c".into(),
            from_version: 0,
            cluster_token: String::new(),
            epoch: 0,
            fragments: false,
            accept_encodings: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(pb::watch_response::Event::Snapshot(_))
    ));

    let member = |id: &str, kinds: usize| pb::Member {
        id: id.into(),
        address: "127.0.0.1:1".into(),
        kinds: (0..kinds).map(|i| format!("k{i}")).collect(),
        ..Default::default()
    };
    let join = |cluster: &str, m: Option<pb::Member>, token: &str| pb::JoinRequest {
        cluster: cluster.into(),
        member: m,
        role: pb::Role::Member as i32,
        cluster_token: token.into(),
        incarnation_secret: String::new(),
        update_only: false,
    };
    let cases: Vec<(&str, pb::JoinRequest, Code)> = vec![
        (
            "empty cluster",
            join("", Some(member("a", 1)), ""),
            Code::InvalidArgument,
        ),
        (
            "oversized cluster name",
            join(&"x".repeat(500), Some(member("a", 1)), ""),
            Code::InvalidArgument,
        ),
        ("no member", join("c", None, ""), Code::InvalidArgument),
        (
            "invalid id",
            join("c", Some(member("Not Valid", 1)), ""),
            Code::InvalidArgument,
        ),
        (
            "too many kinds",
            join("c", Some(member("a", 5)), ""),
            Code::InvalidArgument,
        ),
        (
            "no token",
            join("secure", Some(member("a", 1)), ""),
            Code::Unauthenticated,
        ),
        (
            "wrong token",
            join("secure", Some(member("a", 1)), "guess"),
            Code::Unauthenticated,
        ),
        (
            "address without a port",
            join(
                "c",
                Some(pb::Member {
                    address: "no-port".into(),
                    ..member("a", 1)
                }),
                "",
            ),
            Code::InvalidArgument,
        ),
        (
            "port out of range",
            join(
                "c",
                Some(pb::Member {
                    address: "127.0.0.1:99999".into(),
                    ..member("a", 1)
                }),
                "",
            ),
            Code::InvalidArgument,
        ),
        (
            "role not set",
            pb::JoinRequest {
                role: pb::Role::Unspecified as i32,
                ..join("c", Some(member("a", 1)), "")
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, req, code) in cases {
        let err = client.join(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what} has a message");
    }
    let mut huge = member("a", 1);
    huge.metadata.insert("blob".into(), "x".repeat(10_000));
    let err = client.join(join("c", Some(huge), "")).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "oversized message: {err:?}"
    );
    let err = client
        .heartbeat(pb::HeartbeatRequest {
            cluster: "c".into(),
            member_token: "forged".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .leave(pb::LeaveRequest {
            cluster: "c".into(),
            member_token: "forged".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .resolve(pb::ResolveRequest {
            cluster: "c".into(),
            member_id: "nobody".into(),
            cluster_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .watch(pb::WatchRequest {
            cluster: "secure".into(),
            from_version: 0,
            cluster_token: "guess".into(),
            epoch: 0,
            fragments: false,
            accept_encodings: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The watcher opened before all this still works: a valid join reaches it as an update.
    let ok = client
        .join(join("c", Some(member("good", 2)), ""))
        .await
        .unwrap()
        .into_inner();
    let update = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch.message().await.unwrap().unwrap().event {
                Some(pb::watch_response::Event::Update(u)) => break u,
                Some(pb::watch_response::Event::Snapshot(s))
                    if !shoal::registry::wire::snapshot_members(s.clone())
                        .unwrap()
                        .is_empty() =>
                {
                    panic!("expected an incremental update, got a snapshot")
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        update
            .joined
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["good"]
    );
    assert_eq!(update.version, ok.topology_version);
    assert_ne!(update.epoch, 0, "every message names the registry's epoch");
    // A watcher that already holds the current version of this epoch resumes without a
    // snapshot; one that holds the same version number of another epoch gets a snapshot.
    let resume = |epoch| pb::WatchRequest {
        cluster: "c".into(),
        from_version: ok.topology_version,
        cluster_token: String::new(),
        epoch,
        fragments: false,
        accept_encodings: Vec::new(),
    };
    let mut resumed = client
        .watch(resume(update.epoch))
        .await
        .unwrap()
        .into_inner();
    match resumed.message().await.unwrap().unwrap().event {
        Some(pb::watch_response::Event::Progress(p)) => {
            assert_eq!((p.epoch, p.version), (update.epoch, ok.topology_version))
        }
        other => panic!("expected progress for an up-to-date watcher, got {other:?}"),
    }
    let mut other_run = client
        .watch(resume(update.epoch ^ 1))
        .await
        .unwrap()
        .into_inner();
    match other_run.message().await.unwrap().unwrap().event {
        Some(pb::watch_response::Event::Snapshot(s)) => {
            assert_eq!((s.epoch, s.version), (update.epoch, ok.topology_version))
        }
        other => panic!("expected a snapshot for a watcher of another epoch, got {other:?}"),
    }
    // A token authenticates a cluster.
    assert!(
        client
            .join(join("secure", Some(member("s", 1)), "t0ken"))
            .await
            .is_ok()
    );
}

#[test]
fn cli_exits_nonzero_with_a_clear_message_when_the_registry_is_unreachable() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = std::process::Command::new(shoal_bin())
        .args([
            "member",
            "--registry",
            &dead,
            "--cluster",
            "c",
            "--advertise",
            &format!("127.0.0.1:{}", free_port()),
            "--kinds",
            "a",
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot join cluster") && err.contains(&dead),
        "{err}"
    );
    let (ok, _, err) = topology(&dead, "c", &["--timeout", "1s"]);
    assert!(!ok);
    assert!(err.contains("cannot reach the registry"), "{err}");
    // Bad flags name the flag.
    let out = std::process::Command::new(registry_bin())
        .args(["--ttl", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ttl"));
}

/// What an operator meets: the heartbeat interval derives from the TTL (`--ttl 2s` just works),
/// a pair that leaves no room for missed heartbeats is refused naming the flags, secrets come
/// from files instead of the command line, and logs written to a pipe carry no colour codes.
#[test]
fn operator_settings_derive_the_heartbeat_read_tokens_from_files_and_log_plainly() {
    let out = std::process::Command::new(registry_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ttl",
            "3s",
            "--heartbeat-interval",
            "2s",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("two missed heartbeats") && err.contains("--heartbeat-interval"),
        "{err}"
    );
    let dir = temp_dir("tokens");
    let registry_tokens = write(
        &dir,
        "registry-tokens",
        "# cluster secrets\n\nsecure=t0ken\n",
    );
    let member_token = write(&dir, "member-token", "t0ken\n");
    let wrong_token = write(&dir, "wrong-token", "guess\n");
    let (registry, addr) = start_registry(
        "127.0.0.1:0",
        &["--ttl", "2s", "--cluster-token-file", &registry_tokens],
    );
    let u = url(&addr);
    let m = start_member("m", &u, "secure", &["--cluster-token-file", &member_token]);
    m.wait_snapshot("the member in the token cluster", 20, |v| {
        member_count(v) == 1
    });
    let (ok, _, err) = topology(&u, "secure", &["--cluster-token-file", &wrong_token]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, out, err) = topology(&u, "secure", &["--cluster-token-file", &member_token]);
    assert!(ok, "{err}");
    assert!(out.contains("\"members\""), "{out}");
    let logs = registry.err_lines.lock().unwrap().clone();
    assert!(
        logs.iter().any(|l| l.contains("registry serving")),
        "{logs:?}"
    );
    assert!(
        logs.iter().all(|l| !l.contains('\u{1b}')),
        "ANSI codes in logs written to a pipe: {logs:?}"
    );
    let bad = write(&dir, "bad-tokens", "secure\n");
    let out = std::process::Command::new(registry_bin())
        .args(["--listen", "127.0.0.1:0", "--cluster-token-file", &bad])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cluster-token-file") && err.contains("line 1"),
        "{err}"
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn tls_member_joins_and_plaintext_is_refused() {
    let dir = temp_dir("tls");
    let (ca, cert, key, _, _) = pki(&dir);
    let mut args = FAST.to_vec();
    args.extend([
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-handshake-timeout",
        "1s",
    ]);
    let (_registry, addr) = start_registry("127.0.0.1:0", &args);
    let port = addr.rsplit(':').next().unwrap();
    let https = format!("https://localhost:{port}");
    // A client that connects and never starts its handshake is disconnected after the
    // handshake timeout, instead of holding a socket for good.
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let opened = Instant::now();
    let mut buf = [0u8; 16];
    let closed = matches!(std::io::Read::read(&mut silent, &mut buf), Ok(0) | Err(_))
        && opened.elapsed() < Duration::from_secs(8);
    assert!(
        closed,
        "a silent TLS client was still connected after {:?}",
        opened.elapsed()
    );
    let m = start_member("tls-member", &https, "c", &["--ca", &ca]);
    m.wait_snapshot("the member over TLS", 20, |v| member_count(v) == 1);
    let (ok, out, err) = topology(&https, "c", &["--ca", &ca]);
    assert!(ok, "{err}");
    assert!(out.contains("\"members\""));
    // Plaintext against a TLS port fails, as does TLS without trusting the CA.
    let (ok, _, _) = topology(
        &format!("http://127.0.0.1:{port}"),
        "c",
        &["--timeout", "1s", "--wait", "2s"],
    );
    assert!(!ok, "a plaintext client must be refused");
    let (ok, _, _) = topology(&https, "c", &["--timeout", "1s", "--wait", "2s"]);
    assert!(!ok, "a client that does not trust the CA must fail");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mtls_requires_a_client_certificate() {
    let dir = temp_dir("mtls");
    let (ca, cert, key, client_cert, client_key) = pki(&dir);
    let mut args = FAST.to_vec();
    args.extend(["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &ca]);
    let (_registry, addr) = start_registry("127.0.0.1:0", &args);
    let port = addr.rsplit(':').next().unwrap();
    let https = format!("https://localhost:{port}");
    let (ok, _, _) = topology(
        &https,
        "c",
        &["--ca", &ca, "--timeout", "1s", "--wait", "2s"],
    );
    assert!(!ok, "no client certificate: refused");
    let (ok, _, err) = topology(
        &https,
        "c",
        &["--ca", &ca, "--cert", &client_cert, "--key", &client_key],
    );
    assert!(ok, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn health_service_reports_serving_and_sigterm_drains() {
    let (mut registry, addr) = start_registry("127.0.0.1:0", FAST);
    let channel = tonic::transport::Endpoint::from_shared(url(&addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "shoal.registry.v1.Registry"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let err = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let status = registry.sigterm();
    assert!(status.success(), "SIGTERM drains and exits 0: {status:?}");
}

/// A connection that carries no call for the idle timeout is closed (a socket that never even
/// says hello included), while a watch stream and a heartbeating member, idle at the byte
/// level between messages but never without a call, keep theirs.
#[tokio::test]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = FAST.to_vec();
    args.extend(["--idle-timeout", "1s", "--metrics-listen", &metrics]);
    let (_registry, addr) = start_registry("127.0.0.1:0", &args);
    // A raw socket that sends nothing: closed by the server (read sees EOF or a reset).
    let addr_ = addr.clone();
    let raw = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&addr_).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(started.elapsed()),
                Ok(_) => continue, // the server's HTTP/2 preface and settings
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Err("the idle connection was still open after 20 s".to_string());
                }
                Err(_) => return Ok(started.elapsed()),
            }
        }
    });
    // A watcher and a heartbeating member, each on its own connection.
    let mut watcher = RegistryClient::connect(url(&addr)).await.unwrap();
    let mut stream = watcher
        .watch(pb::WatchRequest {
            cluster: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut member = RegistryClient::connect(url(&addr)).await.unwrap();
    let joined = member
        .join(member_join("m1", "127.0.0.1:7001", ""))
        .await
        .unwrap()
        .into_inner();
    // The member heartbeats every 300 ms from now on (well within the idle timeout).
    let token = joined.member_token.clone();
    let heartbeats = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            member
                .heartbeat(pb::HeartbeatRequest {
                    cluster: "c".into(),
                    member_token: token.clone(),
                })
                .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok::<_, tonic::Status>(())
    });
    let closed_after = raw.await.unwrap().unwrap();
    eprintln!("idle raw connection closed after {closed_after:?}");
    // Meanwhile (four idle timeouts) every heartbeat succeeded, the watch stream still
    // delivers, and only the raw socket was closed as idle.
    heartbeats.await.unwrap().unwrap();
    let mut messages = 0;
    while messages < 3 {
        stream
            .message()
            .await
            .unwrap()
            .expect("the watch stream is open");
        messages += 1;
    }
    assert_eq!(
        metric(&metrics, "shoal_registry_idle_connections_closed_total"),
        Some(1.0)
    );
}

/// A large snapshot goes in fragments to a watcher that asks for them (each fragment is one
/// slice of the snapshot encoded once, concatenated by the watcher), whole to one that does not;
/// Shoal's own provider asks for them and converges through them.
#[tokio::test]
async fn large_snapshots_go_in_fragments_only_to_watchers_that_accept_them() {
    let mut args = FAST.to_vec();
    args.extend_from_slice(&["--snapshot-fragment-bytes", "100"]);
    let (_registry, addr) = start_registry("127.0.0.1:0", &args);
    let mut client = RegistryClient::connect(url(&addr)).await.unwrap();
    for i in 0..8 {
        client
            .join(member_join(
                &format!("m{i}"),
                &format!("127.0.0.1:{}", 7000 + i),
                "s",
            ))
            .await
            .unwrap();
    }
    let watch = |fragments| pb::WatchRequest {
        cluster: "c".into(),
        fragments,
        ..Default::default()
    };
    // Whole: one snapshot with every member.
    let mut whole = client.watch(watch(false)).await.unwrap().into_inner();
    let Some(pb::watch_response::Event::Snapshot(s)) =
        whole.message().await.unwrap().unwrap().event
    else {
        panic!("a snapshot first");
    };
    assert!(!s.fragment);
    let packed = s.packed_members.clone();
    assert!(packed.len() > 100, "{} bytes", packed.len());
    let members = shoal::registry::wire::snapshot_members(s).unwrap();
    assert_eq!(members.len(), 8);
    // Fragments: slices of at most 100 bytes, all but the last marked, same version and epoch.
    let mut stream = client.watch(watch(true)).await.unwrap().into_inner();
    let mut joined = Vec::new();
    let mut n = 0;
    loop {
        let Some(pb::watch_response::Event::Snapshot(s)) =
            stream.message().await.unwrap().unwrap().event
        else {
            panic!("nothing but fragments until the snapshot is complete");
        };
        assert!(s.packed_members.len() <= 100 && s.members.is_empty());
        joined.extend_from_slice(&s.packed_members);
        n += 1;
        if !s.fragment {
            break;
        }
    }
    assert_eq!(n, packed.len().div_ceil(100));
    assert_eq!(
        joined,
        packed.to_vec(),
        "the fragments are the snapshot, in order"
    );
    // Shoal's provider (which asks for fragments) sees every member through them.
    let m = start_member("m", &url(&addr), "c", &[]);
    m.wait_snapshot("the 8 members and itself", 15, |v| member_count(v) == 9);
}

/// A large snapshot goes compressed (zlib, compressed once per version) to a watcher that
/// accepts it, also in fragments, and plain to one that does not (an independent client that
/// never heard of the encoding); both hold the same members, and Shoal's provider, which
/// accepts it, converges through compressed snapshots.
#[tokio::test]
async fn large_snapshots_go_compressed_only_to_watchers_that_accept_it() {
    let metrics = format!("127.0.0.1:{}", free_port());
    // A TTL long enough that the members joined below (which never heartbeat) stay: one
    // version throughout.
    let args = [
        "--ttl",
        "60s",
        "--startup-grace",
        "0s",
        "--snapshot-compress-bytes",
        "300",
        "--snapshot-fragment-bytes",
        "64",
        "--metrics-listen",
        &metrics,
    ];
    let (_registry, addr) = start_registry("127.0.0.1:0", &args);
    let mut client = RegistryClient::connect(url(&addr)).await.unwrap();
    for i in 0..20u32 {
        client
            .join(member_join(
                &format!(
                    "shop-cart-{i:02}-19ac3f2{i:04x}-{:08x}",
                    i.wrapping_mul(2_654_435_761u32)
                ),
                &format!("127.0.0.1:{}", 7000 + i),
                "s",
            ))
            .await
            .unwrap();
    }
    let watch = |fragments, zlib: bool| pb::WatchRequest {
        cluster: "c".into(),
        fragments,
        accept_encodings: if zlib {
            vec![pb::MembersEncoding::Zlib as i32]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    /// The first snapshot of `req`, its fragments concatenated: (encoding, bytes, fragments).
    async fn first_snapshot(
        client: &mut RegistryClient<tonic::transport::Channel>,
        req: pb::WatchRequest,
    ) -> (i32, Vec<u8>, usize) {
        let mut stream = client.watch(req).await.unwrap().into_inner();
        let (mut bytes, mut n, mut encoding) = (Vec::new(), 0, None);
        loop {
            let Some(pb::watch_response::Event::Snapshot(s)) =
                stream.message().await.unwrap().unwrap().event
            else {
                panic!("nothing but fragments until the snapshot is complete");
            };
            assert!(encoding.is_none_or(|e| e == s.encoding), "one encoding");
            encoding = Some(s.encoding);
            bytes.extend_from_slice(&s.packed_members);
            n += 1;
            if !s.fragment {
                return (s.encoding, bytes, n);
            }
        }
    }
    // One watcher stays, so the server keeps the cluster's encodings between the ones below.
    let _held = client
        .watch(watch(false, false))
        .await
        .unwrap()
        .into_inner();
    let (plain_encoding, plain, _) = first_snapshot(&mut client, watch(false, false)).await;
    assert_eq!(plain_encoding, pb::MembersEncoding::Plain as i32);
    let (encoding, zlib, _) = first_snapshot(&mut client, watch(false, true)).await;
    assert_eq!(encoding, pb::MembersEncoding::Zlib as i32);
    assert!(
        zlib.len() < plain.len(),
        "{} -> {}",
        plain.len(),
        zlib.len()
    );
    // Expanded with the compression library itself: the same members, byte for byte.
    let mut expanded = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::ZlibDecoder::new(&zlib[..]),
        &mut expanded,
    )
    .unwrap();
    assert_eq!(expanded, plain);
    let members = shoal::registry::wire::snapshot_members(pb::Snapshot {
        packed_members: zlib.clone().into(),
        encoding,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(members.len(), 20);
    // In fragments: slices of the same compressed bytes.
    let (encoding, pieces, n) = first_snapshot(&mut client, watch(true, true)).await;
    assert_eq!(encoding, pb::MembersEncoding::Zlib as i32);
    assert_eq!(pieces, zlib);
    assert_eq!(n, zlib.len().div_ceil(64));
    // Compressed once for this version, however many watchers took it.
    assert_eq!(
        metric(&metrics, "shoal_registry_watch_snapshot_compressions_total"),
        Some(1.0)
    );
    // Shoal's provider asks for compressed snapshots and sees every member through them.
    let m = start_member("m", &url(&addr), "c", &[]);
    m.wait_snapshot("the 20 members and itself", 15, |v| member_count(v) == 21);
}
