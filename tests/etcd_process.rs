//! The etcd provider against a real etcd (Debian's `etcd-server`, installed by
//! scripts/setup.sh), with `shoal member --etcd` and `shoal topology --etcd` as real
//! processes over loopback. Each test starts its own etcd on free ports with a fresh data dir.
#![cfg(not(madsim))]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::*;
use common::process::{Proc, free_port, member_count, shoal_bin};

#[test]
fn members_join_agree_on_versions_and_leave_through_a_real_etcd() {
    let etcd = start_etcd("join");
    let a = member("a", &etcd.url, "2s");
    let mut b = member("b", &etcd.url, "2s");
    let sa = a.wait_snapshot("2 members", 20, |v| member_count(v) == 2);
    let sb = b.wait_snapshot("2 members", 20, |v| member_count(v) == 2);
    // The same revision, the same epoch, the same members, on both.
    assert_eq!(
        (&sa["version"], &sa["epoch"], ids(&sa)),
        (&sb["version"], &sb["epoch"], ids(&sb))
    );
    let (ok, listed, err) = topology(&etcd.url);
    assert!(ok, "{err}");
    assert_eq!(ids(&listed), ids(&sa));
    // kill -9: etcd expires the lease (2 s) and a hears of it.
    b.kill9();
    a.wait_snapshot("b gone", 15, |v| member_count(v) == 1);
    // SIGTERM revokes the lease: the key goes at once.
    let mut a = a;
    assert!(a.sigterm().success());
    let (ok, listed, err) = topology(&etcd.url);
    assert!(ok, "{err}");
    assert_eq!(member_count(&listed), 0, "{listed}");
    drop(etcd.proc);
    let _ = std::fs::remove_dir_all(&etcd.dir);
}

#[test]
fn members_are_listed_again_after_etcd_restarts_with_its_data() {
    let mut etcd = start_etcd("restart");
    let a = member("a", &etcd.url, "4s");
    let b = member("b", &etcd.url, "4s");
    a.wait_snapshot("2 members", 20, |v| member_count(v) == 2);
    b.wait_snapshot("2 members", 20, |v| member_count(v) == 2);
    etcd.proc.kill9();
    std::thread::sleep(Duration::from_secs(1));
    etcd.proc = etcd_at(&etcd.dir.join("data"), etcd.client, etcd.peer);
    // Both members are listed again, and both members' own views agree with etcd's.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, listed, _) = topology(&etcd.url);
        let (va, vb) = (a.last_json(), b.last_json());
        if ok
            && member_count(&listed) == 2
            && va.as_ref().map(ids) == Some(ids(&listed))
            && vb.as_ref().map(ids) == Some(ids(&listed))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not listed again: etcd {listed}, a {va:?}, b {vb:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_dir_all(&etcd.dir);
}

#[test]
fn a_member_whose_watch_revision_was_compacted_lists_again() {
    let mut etcd = start_etcd("compact");
    let a = member("a", &etcd.url, "8s");
    a.wait_snapshot("itself", 20, |v| member_count(v) == 1);
    // a stops; its watch stream breaks (etcd restarts with its data) before the cluster
    // changes, so nothing of the changes is buffered for it; then the history is compacted:
    // a's next watch starts from a compacted revision.
    a.signal("-STOP");
    etcd.proc.kill9();
    etcd.proc = etcd_at(&etcd.dir.join("data"), etcd.client, etcd.peer);
    let mut b = member("b", &etcd.url, "8s");
    b.wait_snapshot("2 members", 20, |v| member_count(v) == 2);
    assert!(b.sigterm().success());
    let c = member("c", &etcd.url, "8s");
    c.wait_snapshot("2 members", 20, |v| member_count(v) == 2);
    let status = Command::new("etcdctl")
        .args(["--endpoints", &etcd.url, "endpoint", "status", "-w", "json"])
        .output()
        .expect("etcdctl (Debian's etcd-client, installed by scripts/setup.sh)");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let revision = status[0]["Status"]["header"]["revision"].as_i64().unwrap();
    let compacted = Command::new("etcdctl")
        .args(["--endpoints", &etcd.url, "compact", &revision.to_string()])
        .status()
        .unwrap();
    assert!(compacted.success());
    a.signal("-CONT");
    // a's watch resumes from a compacted revision: it must list again and see b gone, c in.
    let c_view = c.last_json().unwrap();
    a.wait_snapshot("the compacted changes", 20, |v| ids(v) == ids(&c_view));
    let relisted = a
        .err_lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("listing again") && l.contains("compacted"));
    assert!(relisted, "a did not list again after the compaction");
    let _ = std::fs::remove_dir_all(&etcd.dir);
}

#[test]
fn a_wrong_endpoint_is_an_error_naming_it() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (ok, _, err) = topology(&url);
    assert!(!ok);
    assert!(err.contains(&url), "{err}");
    let out = Command::new(shoal_bin())
        .args([
            "member",
            "--etcd",
            "127.0.0.1:2379",
            "--cluster",
            "c",
            "--advertise",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--etcd") && err.contains("127.0.0.1:2379"),
        "{err}"
    );
}

#[test]
fn members_join_over_tls_with_client_certificates_and_errors_name_the_endpoint() {
    let dir = std::env::temp_dir().join(format!("shoal-etcd-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tls = common::process::pki(&dir);
    let (client, peer) = (free_port(), free_port());
    let _etcd = etcd_with(&dir.join("data"), client, peer, Some(&tls));
    let url = format!("https://127.0.0.1:{client}");
    let (ca, _, _, cert, key) = &tls;
    let advertise = format!("127.0.0.1:{}", free_port());
    let member = Proc::spawn(
        "a",
        shoal_bin(),
        &[
            "member",
            "--etcd",
            &url,
            "--cluster",
            "c",
            "--advertise",
            &advertise,
            "--ca",
            ca,
            "--cert",
            cert,
            "--key",
            key,
        ],
    );
    member.wait_snapshot("itself", 20, |v| member_count(v) == 1);
    // Without a client certificate the TLS handshake is refused: an error naming etcd's URL.
    let out = Command::new(shoal_bin())
        .args([
            "topology",
            "--etcd",
            &url,
            "--cluster",
            "c",
            "--ca",
            ca,
            "--wait",
            "3s",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&url), "{err}");
    // With one, the member is listed.
    let out = Command::new(shoal_bin())
        .args([
            "topology",
            "--etcd",
            &url,
            "--cluster",
            "c",
            "--ca",
            ca,
            "--cert",
            cert,
            "--key",
            key,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(member_count(&listed), 1, "{listed}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The audit's read against a real etcd: a count-only range at a past revision counts the keys
/// as they were then; a revision etcd has not reached is `WentBack` (what a view sees after a
/// restore reused its revisions); a compacted one is `Compacted` (the audit then says nothing).
#[test]
fn counts_at_a_past_revision_a_future_one_and_a_compacted_one() {
    use shoal::etcd::api::{EtcdApi, EtcdError};
    use shoal::etcd::client::{EtcdClient, EtcdConnection};
    let etcd = start_etcd("count");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let connection = EtcdConnection {
            endpoints: vec![etcd.url.clone()],
            connect_timeout: Duration::from_secs(5),
            ..EtcdConnection::default()
        };
        let client = EtcdClient::connect(&connection).await.unwrap();
        let r1 = client.put("/m/a", b"1".to_vec(), 0).await.unwrap();
        let r2 = client.put("/m/b", b"2".to_vec(), 0).await.unwrap();
        let r3 = client.delete("/m/a").await.unwrap();
        client.put("/other", b"x".to_vec(), 0).await.unwrap();
        assert_eq!(client.count_prefix("/m/", r1).await, Ok(1));
        assert_eq!(client.count_prefix("/m/", r2).await, Ok(2));
        assert_eq!(client.count_prefix("/m/", r3).await, Ok(1));
        let now = client.range_prefix("/m/").await.unwrap().revision;
        match client.count_prefix("/m/", now + 10).await {
            Err(EtcdError::WentBack { requested, current }) => {
                assert_eq!((requested, current), (now + 10, now));
            }
            other => panic!("a future revision: {other:?}"),
        }
        // The strong audit's point read: when a key was last written as of a revision.
        assert_eq!(client.mod_revision_at("/m/a", r2).await, Ok(Some(r1)));
        assert_eq!(client.mod_revision_at("/m/a", r3).await, Ok(None));
        assert_eq!(client.mod_revision_at("/m/b", r1).await, Ok(None));
        assert_eq!(client.mod_revision_at("/m/b", now).await, Ok(Some(r2)));
        assert!(matches!(
            client.mod_revision_at("/m/b", now + 10).await,
            Err(EtcdError::WentBack { current, .. }) if current == now
        ));
        etcdctl(&etcd.url, &["compact", &now.to_string()]);
        assert!(
            matches!(
                client.count_prefix("/m/", r1).await,
                Err(EtcdError::Compacted { .. })
            ),
            "a compacted revision"
        );
        assert!(matches!(
            client.mod_revision_at("/m/a", r1).await,
            Err(EtcdError::Compacted { .. })
        ));
    });
    let _ = std::fs::remove_dir_all(&etcd.dir);
}

/// A list larger than the 4 MiB a gRPC client decodes in one response (6,000 members of about
/// 1 KB each, 6.5 MB) is read in pages at one revision: `shoal topology` lists every member.
/// (Before: the range failed for good, "decoded message length too large".)
#[test]
fn a_list_above_four_mebibytes_is_read_in_pages() {
    use futures::StreamExt;
    use shoal::etcd::api::EtcdApi;
    use shoal::etcd::client::{EtcdClient, EtcdConnection};
    use shoal::etcd::members::{encode_member, members_prefix};
    use shoal::{Member, MemberId};
    const MEMBERS: u32 = 6_000;
    let etcd = start_etcd("large");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let connection = EtcdConnection {
            endpoints: vec![etcd.url.clone()],
            connect_timeout: Duration::from_secs(5),
            ..EtcdConnection::default()
        };
        let client = std::sync::Arc::new(EtcdClient::connect(&connection).await.unwrap());
        let (lease, _) = client.lease_grant(Duration::from_secs(300)).await.unwrap();
        let prefix = members_prefix("/shoal", "c");
        let bytes: usize = futures::stream::iter(0..MEMBERS)
            .map(|i| {
                let (client, prefix) = (client.clone(), prefix.clone());
                async move {
                    let id = MemberId::parse(format!("m{i}")).unwrap();
                    let address = format!("10.{}.{}.{}:4000", i / 65_536, i / 256 % 256, i % 256);
                    let mut m = Member::new(id, address, ["user"]);
                    m.metadata.insert("pad".into(), "x".repeat(1_000));
                    let value = encode_member(&m);
                    let len = value.len();
                    client
                        .put(&format!("{prefix}{}", m.id), value, lease)
                        .await
                        .unwrap();
                    len
                }
            })
            .buffer_unordered(64)
            .fold(0, |sum, len| async move { sum + len })
            .await;
        assert!(
            bytes > 6 << 20,
            "{bytes} bytes: above what one response may carry"
        );
    });
    let (ok, listed, err) = topology(&etcd.url);
    assert!(ok, "{err}");
    assert_eq!(member_count(&listed), MEMBERS as usize);
    let _ = std::fs::remove_dir_all(&etcd.dir);
}

/// Turns authentication on: user `root`, password `s3cret`.
fn enable_auth(url: &str) {
    etcdctl(url, &["user", "add", "root:s3cret"]);
    etcdctl(url, &["auth", "enable"]);
}

/// `shoal member` as `root` (4 s lease).
fn auth_member(name: &str, etcd: &str) -> Proc {
    auth_member_for(name, etcd, "4s")
}

/// `shoal member` as `root` with a lease of `ttl`.
fn auth_member_for(name: &str, etcd: &str, ttl: &str) -> Proc {
    member_with(
        name,
        etcd,
        ttl,
        &["--etcd-user", "root"],
        &[("SHOAL_ETCD_PASSWORD", "s3cret")],
    )
}

/// etcd's simple auth tokens live in its memory: once etcd restarts, every token the members
/// hold is refused (`invalid auth token`). The members authenticate again and go on: a member
/// killed after the restart is dropped by the others, and one started after it is seen.
/// (Before: every view froze for good, the killed member stayed listed, and nothing was logged
/// above debug.)
#[test]
fn members_with_a_password_authenticate_again_after_etcd_restarts() {
    let mut etcd = start_etcd("reauth");
    enable_auth(&etcd.url);
    let a = auth_member("a", &etcd.url);
    let b = auth_member("b", &etcd.url);
    let mut c = auth_member("c", &etcd.url);
    for m in [&a, &b, &c] {
        m.wait_snapshot("3 members", 20, |v| member_count(v) == 3);
    }
    etcd.proc.kill9();
    std::thread::sleep(Duration::from_secs(1));
    etcd.proc = etcd_at(&etcd.dir.join("data"), etcd.client, etcd.peer);
    c.kill9();
    a.wait_snapshot("the killed member dropped", 30, |v| member_count(v) == 2);
    b.wait_snapshot("the killed member dropped", 30, |v| member_count(v) == 2);
    let d = auth_member("d", &etcd.url);
    for m in [&a, &b, &d] {
        m.wait_snapshot("the new member listed", 20, |v| member_count(v) == 3);
    }
    let _ = std::fs::remove_dir_all(&etcd.dir);
}

/// etcd's simple auth tokens expire once unused for `--auth-token-ttl` (2 s here): members
/// paused past it (not past their 8 s lease) hold dead tokens. When one's key is then deleted it
/// registers again, with requests etcd refuses as `invalid auth token` until it authenticates
/// again; it is listed again, as a new incarnation, by both members. (Before re-authentication,
/// such a member could never register again.)
#[test]
fn a_member_whose_auth_token_expired_authenticates_again_and_registers() {
    let etcd = start_etcd_with("token-ttl", &["--auth-token-ttl", "2"]);
    enable_auth(&etcd.url);
    let root = ["--user", "root:s3cret"];
    let a = auth_member_for("a", &etcd.url, "8s");
    let b = auth_member_for("b", &etcd.url, "8s");
    let admin = Some(("root", "s3cret"));
    wait_views_agree_as(&etcd.url, admin, &[&a, &b], 2, 20, "two members");

    for m in [&a, &b] {
        m.signal("-STOP");
    }
    std::thread::sleep(Duration::from_secs(4));
    for m in [&a, &b] {
        m.signal("-CONT");
    }
    let keys = member_keys_as(&etcd.url, &root);
    assert_eq!(keys.len(), 2, "{keys:?}");
    let deleted = keys[0]
        .0
        .trim_start_matches("/shoal/c/members/")
        .to_string();
    etcdctl(&etcd.url, &[&root[..], &["del", &keys[0].0][..]].concat());

    wait_views_agree_as(
        &etcd.url,
        admin,
        &[&a, &b],
        2,
        20,
        "the member with an expired token registered again",
    );
    let listed = a.last_json().map(|v| ids(&v)).unwrap_or_default();
    assert!(
        !listed.contains(&deleted),
        "{deleted} still listed: {listed:?}"
    );
    let said = |p: &Proc| {
        p.err_lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("authenticating again"))
    };
    assert!(
        said(&a) || said(&b),
        "no member said it authenticated again, though its token had expired"
    );
}

#[test]
fn a_user_and_password_are_passed_to_etcd_and_a_wrong_one_is_refused() {
    let etcd = start_etcd("auth");
    enable_auth(&etcd.url);
    let advertise = format!("127.0.0.1:{}", free_port());
    let member = Proc::spawn_with(
        "a",
        shoal_bin(),
        &[
            "member",
            "--etcd",
            &etcd.url,
            "--cluster",
            "c",
            "--advertise",
            &advertise,
            "--etcd-user",
            "root",
        ],
        &[("SHOAL_ETCD_PASSWORD", "s3cret")],
    );
    member.wait_snapshot("itself", 20, |v| member_count(v) == 1);
    let out = Command::new(shoal_bin())
        .args([
            "topology",
            "--etcd",
            &etcd.url,
            "--cluster",
            "c",
            "--etcd-user",
            "root",
            "--etcd-password",
            "wrong",
            "--wait",
            "3s",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--etcd") && err.contains(&etcd.url), "{err}");
    let _ = std::fs::remove_dir_all(&etcd.dir);
}

/// The ids of the members in `shoal topology`'s listing.
fn listed_ids(etcd: &str) -> Vec<String> {
    let (ok, listed, err) = topology(etcd);
    assert!(ok, "{err}");
    ids(&listed)
}

#[test]
fn a_revoked_lease_or_a_deleted_key_is_a_new_incarnation_everyone_lists() {
    let etcd = start_etcd("revoke");
    let a = member("a", &etcd.url, "6s");
    let b = member("b", &etcd.url, "6s");
    wait_views_agree(&etcd.url, &[&a, &b], 2, 20, "two members");
    let old = listed_ids(&etcd.url);
    let keys = member_keys(&etcd.url);
    assert_eq!(keys.len(), 2, "{keys:?}");
    // An operator revokes one member's lease and deletes the other's key.
    etcdctl(&etcd.url, &["lease", "revoke", &keys[0].1]);
    etcdctl(&etcd.url, &["del", &keys[1].0]);
    for m in [&a, &b] {
        m.wait_line("membership restored", 20, |l| {
            l.contains("\"membership-restored\"")
        });
        assert_eq!(m.json_lines("membership-lost").len(), 1, "{}", m.name);
    }
    wait_views_agree(&etcd.url, &[&a, &b], 2, 20, "both back as new incarnations");
    let new = listed_ids(&etcd.url);
    assert!(new.iter().all(|id| !old.contains(id)), "{old:?} {new:?}");
}

#[test]
fn a_member_paused_past_its_ttl_is_dropped_and_comes_back_as_a_new_incarnation() {
    let etcd = start_etcd("pause");
    let a = member("a", &etcd.url, "4s");
    let b = member("b", &etcd.url, "4s");
    wait_views_agree(&etcd.url, &[&a, &b], 2, 20, "two members");
    let old = listed_ids(&etcd.url);
    a.signal("-STOP");
    b.wait_snapshot("the paused member dropped", 15, |v| member_count(v) == 1);
    a.signal("-CONT");
    a.wait_line("membership restored", 20, |l| {
        l.contains("\"membership-restored\"")
    });
    assert_eq!(a.json_lines("membership-lost").len(), 1);
    assert!(b.json_lines("membership-lost").is_empty());
    wait_views_agree(&etcd.url, &[&a, &b], 2, 20, "the paused member back");
    let new = listed_ids(&etcd.url);
    assert_eq!(
        new.iter().filter(|id| old.contains(id)).count(),
        1,
        "{old:?} {new:?}"
    );
}

/// The etcd cluster id as `etcdctl endpoint status` reports it.
fn cluster_id(etcd: &str) -> u64 {
    let out = etcdctl(etcd, &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["Status"]["header"]["cluster_id"].as_u64().unwrap()
}

#[test]
fn a_snapshot_restore_with_the_same_cluster_id_leaves_no_phantom_member() {
    let mut etcd = start_etcd("restore");
    let a = member("a", &etcd.url, "4s");
    let b = member("b", &etcd.url, "4s");
    wait_views_agree(&etcd.url, &[&a, &b], 2, 20, "two members");
    let snapshot = etcd.dir.join("snapshot.db");
    let snapshot = snapshot.to_string_lossy().into_owned();
    etcdctl(&etcd.url, &["snapshot", "save", &snapshot]);
    let c = member("c", &etcd.url, "4s");
    wait_views_agree(&etcd.url, &[&a, &b, &c], 3, 20, "three members");
    let id = cluster_id(&etcd.url);
    etcd.proc.kill9();
    // Restored with the same name, peer URL and cluster token: the same cluster id, and a
    // store that never saw c (nor the revisions after the snapshot).
    let restored = etcd.dir.join("restored");
    let peer = format!("http://127.0.0.1:{}", etcd.peer);
    etcdctl(
        &etcd.url,
        &[
            "snapshot",
            "restore",
            &snapshot,
            "--name",
            "t",
            "--data-dir",
            &restored.to_string_lossy(),
            "--initial-cluster",
            &format!("t={peer}"),
            "--initial-advertise-peer-urls",
            &peer,
        ],
    );
    etcd.proc = etcd_at(&restored, etcd.client, etcd.peer);
    assert_eq!(cluster_id(&etcd.url), id, "the restore kept the cluster id");
    // c comes back as a new incarnation; nobody keeps its old key listed.
    wait_views_agree(&etcd.url, &[&a, &b, &c], 3, 30, "after the restore");
    let _ = std::fs::remove_dir_all(&etcd.dir);
}

/// Members that authenticate as a user whose role may read and write the prefix only (not
/// root). When the role loses its grant, a member that must write again (its key was deleted)
/// is refused: it says so at warn, and re-joins once the grant is back.
#[test]
fn members_with_a_least_privilege_role_work_and_say_so_when_it_loses_its_grant() {
    let etcd = start_etcd("role");
    let root = ["--user", "root:s3cret"];
    etcdctl(&etcd.url, &["user", "add", "root:s3cret"]);
    etcdctl(&etcd.url, &["role", "add", "shoal"]);
    let grant = [
        "role",
        "grant-permission",
        "shoal",
        "readwrite",
        "/shoal/",
        "--prefix=true",
    ];
    etcdctl(&etcd.url, &grant);
    etcdctl(&etcd.url, &["user", "add", "member:pw"]);
    etcdctl(&etcd.url, &["user", "grant-role", "member", "shoal"]);
    etcdctl(&etcd.url, &["auth", "enable"]);
    let as_member = |name| {
        member_with(
            name,
            &etcd.url,
            "4s",
            &["--etcd-user", "member"],
            &[("SHOAL_ETCD_PASSWORD", "pw")],
        )
    };
    let a = as_member("a");
    let b = as_member("b");
    let admin = Some(("root", "s3cret"));
    wait_views_agree_as(&etcd.url, admin, &[&a, &b], 2, 20, "two members as a role");

    let revoke = [
        "role",
        "revoke-permission",
        "shoal",
        "/shoal/",
        "--prefix=true",
    ];
    etcdctl(&etcd.url, &[&root[..], &revoke[..]].concat());
    let keys = member_keys_as(&etcd.url, &root);
    etcdctl(&etcd.url, &[&root[..], &["del", &keys[0].0][..]].concat());
    let refused = |p: &Proc| {
        p.err_lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("etcd refused this member's request"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(refused(&a) || refused(&b)) {
        assert!(Instant::now() < deadline, "no member said etcd refused it");
        std::thread::sleep(Duration::from_millis(200));
    }
    etcdctl(&etcd.url, &[&root[..], &grant[..]].concat());
    wait_views_agree_as(
        &etcd.url,
        admin,
        &[&a, &b],
        2,
        30,
        "back once the grant is back",
    );
}
