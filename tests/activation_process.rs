//! Activation across real processes over loopback: `shoal member --actors` members behind a
//! real `shoal-registry`, called with `shoal call`. An identity is served by exactly one member
//! before and after its owner is killed.
#![cfg(not(madsim))]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::*;

const CLUSTER: &str = "actors";

fn member(name: &str, url: &str) -> (Proc, String) {
    let advertise = format!("127.0.0.1:{}", free_port());
    let p = Proc::spawn(
        name,
        shoal_bin(),
        &[
            "member",
            "--registry",
            url,
            "--cluster",
            CLUSTER,
            "--advertise",
            &advertise,
            "--kinds",
            "user",
            "--actors",
            "--drain",
            "500ms",
        ],
    );
    (p, advertise)
}

/// `shoal call` once: the answer's JSON, or the error text.
fn call(url: &str, identity: &str) -> Result<serde_json::Value, String> {
    let out = Command::new(shoal_bin())
        .args([
            "call",
            "--registry",
            url,
            "--cluster",
            CLUSTER,
            "--timeout",
            "1s",
            "user",
            identity,
        ])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Calls until one succeeds and `pred` holds for it, within `secs`.
fn call_until(
    url: &str,
    identity: &str,
    secs: u64,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while Instant::now() < deadline {
        match call(url, identity) {
            Ok(v) if pred(&v) => return v,
            other => last = Some(other),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no suitable answer for {identity} within {secs} s; last: {last:?}");
}

/// The identities `p` printed as activated and not deactivated since.
fn active_on(p: &Proc, identity: &str) -> bool {
    let mut active = false;
    for v in p
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["identity"] == identity)
    {
        match v["event"].as_str() {
            Some("activated") => active = true,
            Some("deactivated") => active = false,
            _ => {}
        }
    }
    active
}

/// The addresses of the members holding `identity` active.
fn holders<'a>(members: &'a [(Proc, String)], identity: &str) -> Vec<&'a str> {
    members
        .iter()
        .filter(|(p, _)| active_on(p, identity))
        .map(|(_, a)| a.as_str())
        .collect()
}

fn calls_of(v: &serde_json::Value) -> u64 {
    let payload: serde_json::Value = serde_json::from_str(v["payload"].as_str().unwrap()).unwrap();
    payload["calls"].as_u64().unwrap()
}

#[test]
fn an_identity_is_served_by_exactly_one_member_before_and_after_its_owner_is_killed() {
    let (_registry, addr) = start_registry(
        "127.0.0.1:0",
        &[
            "--ttl",
            "3s",
            "--heartbeat-interval",
            "1s",
            "--startup-grace",
            "0s",
        ],
    );
    let url = format!("http://{addr}");
    let mut members: Vec<(Proc, String)> = (0..3).map(|i| member(&format!("m{i}"), &url)).collect();
    for (p, _) in &members {
        p.wait_snapshot("three members", 20, |v| member_count(v) == 3);
    }

    // Before: every call is served by one member, and only it holds the identity active.
    let first = call_until(&url, "alice", 20, |_| true);
    let owner = first["served_by"].as_str().unwrap().to_string();
    let owner_addr = first["address"].as_str().unwrap().to_string();
    for n in 2..=4 {
        let v = call_until(&url, "alice", 10, |_| true);
        assert_eq!(v["served_by"], owner.as_str(), "{v}");
        assert_eq!(calls_of(&v), n, "{v}");
    }
    assert_eq!(
        holders(&members, "alice"),
        vec![owner_addr.as_str()],
        "exactly the owner holds it"
    );

    // The owner is killed: within the TTL another member takes it over (its state died with
    // the process, so counting starts again) and is the only live holder.
    let i = members.iter().position(|(_, a)| *a == owner_addr).unwrap();
    let (mut dead, _) = members.remove(i);
    dead.kill9();
    let killed_at = Instant::now();
    let moved = call_until(&url, "alice", 20, |v| v["served_by"] != owner.as_str());
    eprintln!("taken over {:?} after the kill", killed_at.elapsed());
    let new_owner = moved["served_by"].as_str().unwrap().to_string();
    let new_addr = moved["address"].as_str().unwrap().to_string();
    assert_eq!(calls_of(&moved), 1, "{moved}");
    for n in 2..=3 {
        let v = call_until(&url, "alice", 10, |_| true);
        assert_eq!(v["served_by"], new_owner.as_str(), "{v}");
        assert_eq!(calls_of(&v), n, "{v}");
    }
    assert_eq!(
        holders(&members, "alice"),
        vec![new_addr.as_str()],
        "exactly the new owner holds it"
    );

    // A graceful leave deactivates before the member is gone; the last member takes over.
    let j = members.iter().position(|(_, a)| *a == new_addr).unwrap();
    let (mut leaving, _) = members.remove(j);
    assert!(leaving.sigterm().success());
    assert!(!active_on(&leaving, "alice"), "deactivated on shutdown");
    let last = call_until(&url, "alice", 20, |v| v["served_by"] != new_owner.as_str());
    assert_eq!(last["address"], members[0].1.as_str(), "{last}");
    assert!(active_on(&members[0].0, "alice"));
}

#[test]
fn call_names_the_problem_when_nobody_hosts_the_kind_or_the_cluster_is_missing() {
    let (_registry, addr) = start_registry("127.0.0.1:0", &["--startup-grace", "0s"]);
    let url = format!("http://{addr}");
    let (_m, _) = member("m0", &url);
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new(shoal_bin())
        .args([
            "call",
            "--registry",
            &url,
            "--cluster",
            CLUSTER,
            "order",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no member hosts kind \"order\""), "{err}");
    let out = Command::new(shoal_bin())
        .args(["call", "--registry", &url, "--cluster", "", "user", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster"));
}
