//! Running the real binaries as processes over loopback (normal build only).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child process whose stdout lines are collected in the background; killed on drop.
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    /// The first stderr lines (logs).
    pub err_lines: Arc<Mutex<Vec<String>>>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, bin: &str, args: &[&str]) -> Proc {
        Self::spawn_with(name, bin, args, &[])
    }

    /// [`Self::spawn`] with extra environment variables.
    pub fn spawn_with(name: &str, bin: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        // A process group of its own, so that killing it kills what it started too (faketime
        // runs the registry as its child).
        let mut child = Command::new(bin)
            .process_group(0)
            .args(args)
            .envs(envs.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let err = child.stderr.take().unwrap();
        let tag = name.to_string();
        let err_lines = Arc::new(Mutex::new(Vec::new()));
        let err_sink = err_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if std::env::var_os("SHOAL_TEST_VERBOSE").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                let mut kept = err_sink.lock().unwrap();
                if kept.len() < 10_000 {
                    kept.push(line);
                }
            }
        });
        Proc {
            child,
            lines,
            err_lines,
            name: name.to_string(),
        }
    }

    /// Waits until a stdout line satisfies `pred`; returns it.
    pub fn wait_line(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for {what}; output: {:?}",
                self.name,
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The newest snapshot line (`"event": "snapshot"`) parsed as JSON, if any.
    pub fn last_json(&self) -> Option<serde_json::Value> {
        self.json_lines("snapshot").pop()
    }

    /// Every stdout line that is a JSON object with `"event": event`, in order.
    pub fn json_lines(&self, event: &str) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// Waits until the newest snapshot line satisfies `pred`; returns it.
    pub fn wait_snapshot(
        &self,
        what: &str,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = self.last_json().filter(|v| pred(v)) {
                return v;
            }
            if Instant::now() >= deadline {
                let log = self.err_lines.lock().unwrap();
                let tail = &log[log.len().saturating_sub(12)..];
                panic!(
                    "{}: timed out waiting for {what}; last: {:?}\nits last log lines:\n{}",
                    self.name,
                    self.last_json(),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (like `-STOP` or `-CONT`) to the process and everything it started
    /// (its process group).
    pub fn signal(&self, sig: &str) {
        let group = format!("-{}", self.child.id());
        let ok = Command::new("kill")
            .args([sig, "--", &group])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {sig} -- {group} failed");
    }

    /// Kills the process and everything it started (its process group), and reaps it.
    pub fn kill9(&mut self) {
        kill_group(&mut self.child);
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let group = format!("-{}", self.child.id());
        Command::new("kill")
            .args(["-TERM", "--", &group])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit after SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// SIGKILL to `child`'s process group (it leads one: see [`Proc::spawn_with`]), then reaps it.
fn kill_group(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let group = format!("-{}", child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn registry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_shoal-registry")
}

pub fn shoal_bin() -> &'static str {
    env!("CARGO_BIN_EXE_shoal")
}

/// Starts a registry on an OS-chosen loopback port (or `listen`), returns it with its address.
pub fn start_registry(listen: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["--listen", listen];
    args.extend_from_slice(extra);
    wait_listening(Proc::spawn("registry", registry_bin(), &args))
}

/// Starts a registry whose wall clock is `offset` (libfaketime syntax, like `-10m`) off the
/// host's; its monotonic clock is left alone. Needs `faketime` (scripts/setup.sh installs it).
pub fn start_registry_faketime(offset: &str, listen: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["-f", offset, registry_bin(), "--listen", listen];
    args.extend_from_slice(extra);
    wait_listening(Proc::spawn_with(
        "registry",
        "faketime",
        &args,
        &[("FAKETIME_DONT_FAKE_MONOTONIC", "1")],
    ))
}

fn wait_listening(p: Proc) -> (Proc, String) {
    let line = p.wait_line("the listening line", 15, |l| l.starts_with("listening on "));
    let addr = line.trim_start_matches("listening on ").to_string();
    (p, addr)
}

/// A free loopback port for a process a test starts, never handed out twice in this test
/// process, and taken below the kernel's ephemeral range (32768 up on Linux).
///
/// Binding port 0 and releasing it is not enough when tests run in parallel: the kernel hands
/// a released port out again, so a port one test's etcd member had (killed by that test) came
/// back as another test's etcd client port, and the first test's members, still pointed at it,
/// joined the second test's cluster. Ephemeral ports are also what outgoing connections take
/// their source port from, so a port from that range can be taken before the process binds it.
/// Each test binary starts at its own offset (from its process id) so that a port still in
/// TIME_WAIT from the binary before is rarely the first one tried; every candidate is checked
/// by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() % 200) * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN)
}

/// Starts `shoal member`.
pub fn start_member(name: &str, registry_url: &str, cluster: &str, extra: &[&str]) -> Proc {
    let advertise = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "member",
        "--registry",
        registry_url,
        "--cluster",
        cluster,
        "--advertise",
        &advertise,
        "--kinds",
        "user,order",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(name, shoal_bin(), &args)
}

/// Number of members in a snapshot line.
pub fn member_count(v: &serde_json::Value) -> usize {
    v["members"].as_array().map_or(0, Vec::len)
}

/// Runs `shoal topology --json`; returns (exit success, stdout, stderr).
pub fn topology(registry_url: &str, cluster: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "topology",
        "--registry",
        registry_url,
        "--cluster",
        cluster,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(shoal_bin()).args(&args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Scrapes a Prometheus endpoint and returns the value of `metric` (first sample).
pub fn metric(addr: &str, metric: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// A CA, a server certificate for `localhost` and `127.0.0.1`, and a client certificate, as PEM
/// files in `dir`: (ca, server cert, server key, client cert, client key).
pub fn pki(dir: &std::path::Path) -> (String, String, String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["member".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    (
        write(dir, "ca.pem", &ca.pem()),
        write(dir, "server.pem", &server.pem()),
        write(dir, "server.key", &server_key.serialize_pem()),
        write(dir, "client.pem", &client.pem()),
        write(dir, "client.key", &client_key.serialize_pem()),
    )
}
