//! A real etcd (Debian's `etcd-server`) and `shoal` processes against it, over loopback.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{Proc, free_port, shoal_bin};

/// A running etcd: its process, client URL, ports and data dir.
pub struct Etcd {
    pub proc: Proc,
    pub url: String,
    pub client: u16,
    pub peer: u16,
    pub dir: PathBuf,
}

pub fn etcd_at(dir: &Path, client: u16, peer: u16) -> Proc {
    etcd_with(dir, client, peer, None)
}

/// TLS material of an etcd that requires client certificates: (ca, server cert, server key,
/// client cert, client key), PEM files.
pub type Tls = (String, String, String, String, String);

pub fn etcd_with(dir: &Path, client: u16, peer: u16, tls: Option<&Tls>) -> Proc {
    etcd_with_flags(dir, client, peer, tls, &[])
}

/// [`etcd_with`] with extra etcd flags (like `--auth-token-ttl`).
pub fn etcd_with_flags(
    dir: &Path,
    client: u16,
    peer: u16,
    tls: Option<&Tls>,
    flags: &[&str],
) -> Proc {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client_url = format!("{scheme}://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut args: Vec<String> = [
        "--name",
        "t",
        "--data-dir",
        &dir.to_string_lossy(),
        "--listen-client-urls",
        &client_url,
        "--advertise-client-urls",
        &client_url,
        "--listen-peer-urls",
        &peer_url,
        "--initial-advertise-peer-urls",
        &peer_url,
        "--initial-cluster",
        &format!("t={peer_url}"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    if let Some((ca, cert, key, _, _)) = tls {
        for (flag, v) in [
            ("--cert-file", cert),
            ("--key-file", key),
            ("--trusted-ca-file", ca),
        ] {
            args.push(flag.into());
            args.push(v.clone());
        }
        args.push("--client-cert-auth".into());
    }
    args.extend(flags.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Proc::spawn("etcd", "etcd", &args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !match tls {
        None => healthy(client),
        Some(t) => healthy_tls(&client_url, t),
    } {
        assert!(
            Instant::now() < deadline,
            "etcd did not become healthy; log: {:?}",
            p.err_lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

pub fn healthy_tls(url: &str, (ca, _, _, cert, key): &Tls) -> bool {
    Command::new("etcdctl")
        .args([
            "--endpoints",
            url,
            "--cacert",
            ca,
            "--cert",
            cert,
            "--key",
            key,
            "endpoint",
            "health",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn healthy(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

pub fn start_etcd(name: &str) -> Etcd {
    start_etcd_with(name, &[])
}

/// [`start_etcd`] with extra etcd flags.
pub fn start_etcd_with(name: &str, flags: &[&str]) -> Etcd {
    let dir = std::env::temp_dir().join(format!("shoal-etcd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (client, peer) = (free_port(), free_port());
    let proc = etcd_with_flags(&dir.join("data"), client, peer, None, flags);
    Etcd {
        proc,
        url: format!("http://127.0.0.1:{client}"),
        client,
        peer,
        dir,
    }
}

pub fn member(name: &str, etcd: &str, ttl: &str) -> Proc {
    member_with(name, etcd, ttl, &[], &[])
}

/// `shoal member --etcd` with extra arguments and environment.
pub fn member_with(
    name: &str,
    etcd: &str,
    ttl: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let advertise = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "member",
        "--etcd",
        etcd,
        "--cluster",
        "c",
        "--advertise",
        &advertise,
        "--kinds",
        "user",
        "--lease-duration",
        ttl,
    ];
    args.extend_from_slice(extra);
    Proc::spawn_with(name, shoal_bin(), &args, env)
}

/// `shoal topology --etcd URL --cluster c --json`: (success, parsed stdout or null, stderr).
pub fn topology(etcd: &str) -> (bool, serde_json::Value, String) {
    topology_as(etcd, None)
}

/// [`topology`] as etcd user `user` (name, password), when etcd has authentication on.
pub fn topology_as(etcd: &str, user: Option<(&str, &str)>) -> (bool, serde_json::Value, String) {
    let mut command = Command::new(shoal_bin());
    command.args([
        "topology",
        "--etcd",
        etcd,
        "--cluster",
        "c",
        "--json",
        "--wait",
        "5s",
    ]);
    if let Some((name, password)) = user {
        command
            .args(["--etcd-user", name])
            .env("SHOAL_ETCD_PASSWORD", password);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn ids(v: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = v["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// A multi-member etcd cluster on loopback, started by the test: its processes (`None` once
/// killed), client URLs and ports.
pub struct EtcdCluster {
    pub procs: Vec<Option<Proc>>,
    pub urls: Vec<String>,
    pub clients: Vec<u16>,
    pub peers: Vec<u16>,
    pub dir: PathBuf,
    /// The cluster token (`--initial-cluster-token`).
    pub token: String,
}

/// Starts an etcd cluster of `n` members (`e0`..) and waits until every member is healthy.
pub fn start_etcd_cluster(name: &str, n: usize) -> EtcdCluster {
    let dir = std::env::temp_dir().join(format!("shoal-etcdc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let clients: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let peers: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let initial: Vec<String> = (0..n)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peers[i]))
        .collect();
    let initial = initial.join(",");
    let mut cluster = EtcdCluster {
        procs: (0..n).map(|_| None).collect(),
        urls: clients
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect(),
        clients,
        peers,
        dir,
        token: name.to_string(),
    };
    for i in 0..n {
        cluster.procs[i] = Some(cluster.spawn_member(i, &initial, "new"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.clients.iter().all(|p| healthy(*p)) {
        assert!(
            Instant::now() < deadline,
            "the etcd cluster did not become healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster
}

impl EtcdCluster {
    /// The client URLs of members `order`, comma-separated (the `--etcd` of a member).
    pub fn endpoints(&self, order: &[usize]) -> String {
        let urls: Vec<&str> = order.iter().map(|i| self.urls[*i].as_str()).collect();
        urls.join(",")
    }

    /// The index of the current leader among the live members, once they agree on one.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(i) = self.leader_once() {
                return i;
            }
            assert!(Instant::now() < deadline, "the etcd cluster has no leader");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn leader_once(&self) -> Option<usize> {
        (0..self.urls.len())
            .filter(|i| self.procs[*i].is_some())
            .find(|i| {
                let Ok(out) = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args([
                        "--endpoints",
                        &self.urls[*i],
                        "--command-timeout=2s",
                        "endpoint",
                        "status",
                        "-w",
                        "json",
                    ])
                    .output()
                else {
                    return false;
                };
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
                let status = &v[0]["Status"];
                let (leader, me) = (&status["leader"], &status["header"]["member_id"]);
                leader.is_u64() && leader == me
            })
    }

    /// Starts the etcd process of member `i` (`e{i}`) with its data dir, joining `initial`
    /// (`name=peer-url,...`) as a `state` (`new` or `existing`) cluster.
    fn spawn_member(&self, i: usize, initial: &str, state: &str) -> Proc {
        let client = &self.urls[i];
        let peer = format!("http://127.0.0.1:{}", self.peers[i]);
        let data = self
            .dir
            .join(format!("e{i}"))
            .to_string_lossy()
            .into_owned();
        let args = [
            "--name",
            &format!("e{i}"),
            "--data-dir",
            &data,
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            initial,
            "--initial-cluster-token",
            &self.token,
            "--initial-cluster-state",
            state,
        ];
        Proc::spawn(&format!("e{i}"), "etcd", &args)
    }

    /// etcd's id of member `i` (hex, as `etcdctl member remove` takes it), asked of member
    /// `via`.
    pub fn member_id(&self, i: usize, via: usize) -> String {
        let out = etcdctl(&self.urls[via], &["member", "list", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let name = format!("e{i}");
        let id = v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == name.as_str())
            .and_then(|m| m["ID"].as_u64())
            .unwrap_or_else(|| panic!("no etcd member {name} in {out}"));
        format!("{id:x}")
    }

    /// Removes member `i` from the cluster (`etcdctl member remove`, asked of member `via`);
    /// its process exits on its own and its data dir is wiped.
    pub fn remove(&mut self, i: usize, via: usize) {
        let id = self.member_id(i, via);
        // etcd refuses to reconfigure a cluster whose members have not all been connected for
        // 5 s ("unhealthy cluster"): a cluster just started is asked again.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.urls[via], "member", "remove", &id])
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                err.contains("unhealthy cluster") && Instant::now() < deadline,
                "etcdctl member remove {id}: {err}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while healthy(self.clients[i]) {
            assert!(
                Instant::now() < deadline,
                "removed etcd member e{i} still serves"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill(i);
        let _ = std::fs::remove_dir_all(self.dir.join(format!("e{i}")));
    }

    /// Adds member `i` back (`etcdctl member add`, asked of member `via`) and starts it with an
    /// empty data dir, joining the existing cluster; waits until it is healthy.
    pub fn re_add(&mut self, i: usize, via: usize) {
        let peer = format!("http://127.0.0.1:{}", self.peers[i]);
        let name = format!("e{i}");
        let out = etcdctl(
            &self.urls[via],
            &["member", "add", &name, &format!("--peer-urls={peer}")],
        );
        // etcdctl prints the ETCD_INITIAL_CLUSTER the new member must start with.
        let initial = out
            .lines()
            .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER=\""))
            .map(|l| l.trim_end_matches('"').to_string())
            .unwrap_or_else(|| panic!("etcdctl member add printed no initial cluster: {out}"));
        self.procs[i] = Some(self.spawn_member(i, &initial, "existing"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(self.clients[i]) {
            assert!(
                Instant::now() < deadline,
                "re-added etcd member e{i} is not healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.kill9();
        }
    }

    /// Sends `sig` (`-STOP`, `-CONT`) to member `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        if let Some(p) = &self.procs[i] {
            p.signal(sig);
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.signal(i, "-CONT");
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until etcd lists `n` members and each of `members` lists exactly those in its last
/// snapshot (no phantom, nobody missing).
pub fn wait_views_agree(etcd: &str, members: &[&Proc], n: usize, secs: u64, what: &str) {
    wait_views_agree_as(etcd, None, members, n, secs, what)
}

/// [`wait_views_agree`], listing as etcd user `user` (name, password).
pub fn wait_views_agree_as(
    etcd: &str,
    user: Option<(&str, &str)>,
    members: &[&Proc],
    n: usize,
    secs: u64,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (ok, listed, _) = topology_as(etcd, user);
        let views: Vec<Option<Vec<String>>> = members
            .iter()
            .map(|m| m.last_json().as_ref().map(ids))
            .collect();
        if ok && ids(&listed).len() == n && views.iter().all(|v| v.as_ref() == Some(&ids(&listed)))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: etcd lists {:?}, the members {views:?}",
            ids(&listed)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `etcdctl` against `etcd` with `args`; its stdout (fails the test if it fails).
pub fn etcdctl(etcd: &str, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", etcd])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The members' keys in etcd and the lease each is bound to (hex, as etcdctl takes it).
pub fn member_keys(etcd: &str) -> Vec<(String, String)> {
    member_keys_as(etcd, &[])
}

/// [`member_keys`] with etcdctl's global flags `flags` (like `--user root:pw`).
pub fn member_keys_as(etcd: &str, flags: &[&str]) -> Vec<(String, String)> {
    let get = ["get", "--prefix", "/shoal/c/members/", "-w", "fields"];
    let out = etcdctl(etcd, &[flags, &get[..]].concat());
    let field = |line: &str, name: &str| {
        line.strip_prefix(&format!("\"{name}\" : "))
            .map(|v| v.trim().trim_matches('"').to_string())
    };
    let mut keys = Vec::new();
    let mut key = None;
    for line in out.lines() {
        if let Some(k) = field(line, "Key") {
            key = Some(k);
        } else if let (Some(lease), Some(k)) = (field(line, "Lease"), key.as_ref()) {
            let lease: i64 = lease.parse().unwrap_or(0);
            keys.push((k.clone(), format!("{lease:x}")));
            key = None;
        }
    }
    keys
}
