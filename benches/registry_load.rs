//! Load benchmark: the bundled `shoal-registry` server against a real etcd, with the same client
//! code shape for both. For N registered members it measures registration, a steady load of one
//! heartbeat per member per second, saturation throughput of back-to-back heartbeats, the fan-out
//! latency of one change to many watchers, and the server's memory. Figures and how to read
//! them: docs/benchmarks/registry.md.
//!
//! ```sh
//! cargo bench --bench registry_load
//! ```
//!
//! Cargo builds the package's binaries for its benchmarks, so `shoal-registry` is built (in the
//! bench profile, into `target/release/`) by that command and found through
//! `CARGO_BIN_EXE_shoal-registry`.
//!
//! etcd is the Debian package `etcd-server` (`apt-get install -y etcd-server`); the benchmark
//! starts it itself on loopback with a fresh data directory per run and kills it afterwards.
//! Without it, only the registry half runs. Every server is a fresh process per system and size,
//! and the two systems are measured one after the other, never at the same time.
//!
//! Environment knobs (defaults in brackets): `SHOAL_BENCH_SIZES` [1000,10000],
//! `SHOAL_BENCH_SYSTEMS` [registry,etcd], `SHOAL_BENCH_CHANNELS` [8], `SHOAL_BENCH_WORKERS` [64],
//! `SHOAL_BENCH_REGISTER_CONCURRENCY` [64], `SHOAL_BENCH_STEADY_SECS` [10],
//! `SHOAL_BENCH_SATURATION_SECS` [5], `SHOAL_BENCH_MAX_WATCHERS` [1000],
//! `SHOAL_BENCH_FRAGMENTS` [1: registry watchers accept fragmented snapshots, as the provider],
//! `SHOAL_BENCH_COMPRESS` [1: registry watchers accept compressed snapshots, as the provider],
//! `SHOAL_BENCH_ETCD_LIST` [0; 1: each etcd watcher lists the prefix first, as a real client],
//! `SHOAL_BENCH_REGISTRATION_WATCHERS` [0] (registry only: watch streams open, and drained,
//! while the members register), `SHOAL_BENCH_REGISTRY_ARGS` [""] (extra `shoal-registry` flags,
//! space-separated, e.g. `--publish-interval 0s`).

// The simulated build (`--cfg madsim`) has no real processes or sockets to measure.
#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
fn main() -> std::process::ExitCode {
    real::main()
}

#[cfg(not(madsim))]
mod real {
    use std::fmt::Display;
    use std::fs::File;
    use std::future::Future;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
    use std::str::FromStr;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
    use std::time::{Duration, Instant};

    use etcd_client::{
        ConnectOptions, EventType, LeaseClient, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
        WatchOptions,
    };
    use shoal::registry::pb::{self, registry_client::RegistryClient};
    use tokio::sync::{Mutex, Semaphore};
    use tokio::task::JoinHandle;
    use tonic::transport::{Channel, Endpoint};

    /// The registry cluster every member joins.
    const CLUSTER: &str = "bench";
    /// The etcd key prefix of the members (what an etcd provider would use).
    const PREFIX: &str = "/shoal/bench/members/";
    /// Registration TTL, both systems (the registry is started with `--ttl 6s`).
    const TTL_SECS: i64 = 6;
    /// Each member heartbeats this often in the steady load.
    const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
    /// Deadline of every single request.
    const RPC_TIMEOUT: Duration = Duration::from_secs(5);
    /// Most watch streams on one HTTP/2 connection (hyper's server default allows 200 streams
    /// per connection).
    const WATCHERS_PER_CONNECTION: usize = 125;

    /// Member tasks: running, running and recording, paused, stopping.
    const RUN: u8 = 0;
    const RECORD: u8 = 1;
    const PAUSE: u8 = 2;
    const STOP: u8 = 3;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum System {
        Registry,
        Etcd,
    }

    impl System {
        fn name(self) -> &'static str {
            match self {
                System::Registry => "registry",
                System::Etcd => "etcd",
            }
        }
    }

    impl FromStr for System {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            match s.trim() {
                "registry" => Ok(System::Registry),
                "etcd" => Ok(System::Etcd),
                other => Err(format!("unknown system {other:?} (registry or etcd)")),
            }
        }
    }

    struct Settings {
        sizes: Vec<usize>,
        systems: Vec<System>,
        channels: usize,
        workers: usize,
        register_concurrency: usize,
        steady: Duration,
        saturation: Duration,
        max_watchers: usize,
        registration_watchers: usize,
        registry_args: Vec<String>,
    }

    fn env<T: FromStr>(name: &str, default: T) -> Result<T, String>
    where
        T::Err: Display,
    {
        match std::env::var(name) {
            Ok(v) => v.trim().parse().map_err(|e| format!("{name}={v:?}: {e}")),
            Err(_) => Ok(default),
        }
    }

    fn env_list<T: FromStr>(name: &str, default: &str) -> Result<Vec<T>, String>
    where
        T::Err: Display,
    {
        let text = std::env::var(name).unwrap_or_else(|_| default.to_string());
        text.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|e| format!("{name}={text:?}: {e}"))
            })
            .collect()
    }

    impl Settings {
        fn from_env() -> Result<Self, String> {
            let s = Settings {
                sizes: env_list("SHOAL_BENCH_SIZES", "1000,10000")?,
                systems: env_list("SHOAL_BENCH_SYSTEMS", "registry,etcd")?,
                channels: env("SHOAL_BENCH_CHANNELS", 8)?,
                workers: env("SHOAL_BENCH_WORKERS", 64)?,
                register_concurrency: env("SHOAL_BENCH_REGISTER_CONCURRENCY", 64)?,
                steady: Duration::from_secs(env("SHOAL_BENCH_STEADY_SECS", 10)?),
                saturation: Duration::from_secs(env("SHOAL_BENCH_SATURATION_SECS", 5)?),
                max_watchers: env("SHOAL_BENCH_MAX_WATCHERS", 1000)?,
                registration_watchers: env("SHOAL_BENCH_REGISTRATION_WATCHERS", 0)?,
                registry_args: std::env::var("SHOAL_BENCH_REGISTRY_ARGS")
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(String::from)
                    .collect(),
            };
            if s.sizes.iter().any(|&n| n == 0 || n > 19_000) {
                return Err("SHOAL_BENCH_SIZES: each size must be in 1..=19000".into());
            }
            if s.channels == 0 || s.workers == 0 || s.register_concurrency == 0 {
                return Err("channels, workers and register concurrency must be positive".into());
            }
            Ok(s)
        }
    }

    // ---------------------------------------------------------------------------------------
    // Measurements.

    /// Latencies (µs) of successful operations, and the failures.
    #[derive(Default)]
    struct Samples {
        micros: Vec<u32>,
        errors: u64,
        first_error: Option<String>,
    }

    impl Samples {
        fn ok(&mut self, d: Duration) {
            self.micros.push(d.as_micros().min(u32::MAX as u128) as u32);
        }

        fn err(&mut self, e: String) {
            self.errors += 1;
            self.first_error.get_or_insert(e);
        }

        fn record(&mut self, started: Instant, result: Result<(), String>) {
            match result {
                Ok(()) => self.ok(started.elapsed()),
                Err(e) => self.err(e),
            }
        }

        fn merge(&mut self, other: Samples) {
            self.micros.extend(other.micros);
            self.errors += other.errors;
            if self.first_error.is_none() {
                self.first_error = other.first_error;
            }
        }

        fn stats(mut self) -> Stats {
            self.micros.sort_unstable();
            let pct = |p: f64| -> f64 {
                if self.micros.is_empty() {
                    return f64::NAN;
                }
                let rank = ((p / 100.0) * self.micros.len() as f64).ceil() as usize;
                self.micros[rank.clamp(1, self.micros.len()) - 1] as f64 / 1000.0
            };
            Stats {
                count: self.micros.len() as u64,
                p50_ms: pct(50.0),
                p99_ms: pct(99.0),
                max_ms: pct(100.0),
                errors: self.errors,
                first_error: self.first_error,
            }
        }
    }

    #[derive(Debug)]
    struct Stats {
        count: u64,
        p50_ms: f64,
        p99_ms: f64,
        max_ms: f64,
        errors: u64,
        first_error: Option<String>,
    }

    fn lock<T>(m: &StdMutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resident and peak resident memory of a process, in KiB.
    #[derive(Clone, Copy, Debug, Default)]
    struct Memory {
        rss_kib: u64,
        hwm_kib: u64,
    }

    fn memory(pid: u32) -> Memory {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }

    /// CPU time (user + system) a process has used, in seconds.
    fn cpu_seconds(pid: &str, ticks_per_second: f64) -> f64 {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may contain spaces) start at field 3.
        let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (ticks(11) + ticks(12)) / ticks_per_second
    }

    fn clock_ticks() -> f64 {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    }

    /// CPU time the whole machine has been busy (not idle, not waiting for I/O), in seconds.
    fn machine_busy_seconds(ticks_per_second: f64) -> f64 {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<f64> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let total: f64 = fields.iter().take(8).sum();
        let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
        (total - idle) / ticks_per_second
    }

    /// CPU used over an interval, in cores.
    #[derive(Clone, Copy, Debug, Default)]
    struct Cpu {
        server: f64,
        client: f64,
        /// Every other process on the machine (noise).
        other: f64,
    }

    /// Measures [`Cpu`] over an interval.
    struct CpuMeter {
        server_pid: String,
        ticks: f64,
        started: Instant,
        server0: f64,
        client0: f64,
        machine0: f64,
    }

    impl CpuMeter {
        fn start(server_pid: u32, ticks: f64) -> Self {
            let server_pid = server_pid.to_string();
            Self {
                server0: cpu_seconds(&server_pid, ticks),
                client0: cpu_seconds("self", ticks),
                machine0: machine_busy_seconds(ticks),
                server_pid,
                ticks,
                started: Instant::now(),
            }
        }

        fn stop(&self) -> Cpu {
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            let server = (cpu_seconds(&self.server_pid, self.ticks) - self.server0) / secs;
            let client = (cpu_seconds("self", self.ticks) - self.client0) / secs;
            let machine = (machine_busy_seconds(self.ticks) - self.machine0) / secs;
            Cpu {
                server,
                client,
                other: (machine - server - client).max(0.0),
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Server processes.

    /// A server process started for one measurement; killed (and its directory removed unless
    /// something failed) when dropped.
    struct ServerProcess {
        system: System,
        child: Child,
        endpoint: String,
        dir: PathBuf,
        keep_dir: bool,
        _stdout: Option<BufReader<ChildStdout>>,
    }

    impl ServerProcess {
        fn pid(&self) -> u32 {
            self.child.id()
        }

        fn memory(&self) -> Memory {
            memory(self.pid())
        }

        /// An error if the process has exited.
        fn check_alive(&mut self) -> Result<(), String> {
            match self.child.try_wait() {
                Ok(None) => Ok(()),
                Ok(Some(status)) => {
                    self.keep_dir = true;
                    Err(format!(
                        "the {} server exited ({status}); see its log in {}",
                        self.system.name(),
                        self.dir.display()
                    ))
                }
                Err(e) => Err(format!(
                    "cannot check the {} server: {e}",
                    self.system.name()
                )),
            }
        }
    }

    impl Drop for ServerProcess {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if self.keep_dir {
                eprintln!(
                    "  {} logs kept in {}",
                    self.system.name(),
                    self.dir.display()
                );
            } else {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
    }

    fn scratch_dir(system: System, n: usize) -> Result<PathBuf, String> {
        let dir = std::env::temp_dir().join(format!(
            "shoal-registry-load-{}-{}-{n}",
            std::process::id(),
            system.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// The `shoal-registry` binary cargo built with this benchmark (cargo builds a package's
    /// binaries for its benchmarks, in the same profile).
    fn registry_binary() -> Result<PathBuf, String> {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_shoal-registry"));
        if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "{} not found; build it with `cargo build --release --bin shoal-registry`",
                bin.display()
            ))
        }
    }

    fn start_registry(bin: &Path, dir: PathBuf, extra: &[String]) -> Result<ServerProcess, String> {
        let log = File::create(dir.join("registry.log"))
            .map_err(|e| format!("cannot create the registry log: {e}"))?;
        let mut child = Command::new(bin)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--ttl",
                "6s",
                "--heartbeat-interval",
                "2s",
                "--startup-grace",
                "0s",
                "--max-members-per-cluster",
                "20000",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let mut server = ServerProcess {
            system: System::Registry,
            child,
            endpoint: String::new(),
            dir,
            keep_dir: false,
            _stdout: None,
        };
        // The registry prints `listening on ADDR` on stdout once it serves.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let result = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send((result, reader));
        });
        let (line, reader) = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok((Ok(line), reader)) => (line, reader),
            Ok((Err(e), _)) => {
                server.keep_dir = true;
                return Err(format!("registry start: cannot read its stdout: {e}"));
            }
            Err(_) => {
                server.keep_dir = true;
                server.check_alive()?;
                return Err("registry start: no `listening on` line within 20 s".into());
            }
        };
        server._stdout = Some(reader);
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            server.keep_dir = true;
            server.check_alive()?;
            return Err(format!(
                "registry start: expected `listening on ADDR`, got {line:?}"
            ));
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| format!("registry start: bad address {addr:?}: {e}"))?;
        server.endpoint = format!("http://{addr}");
        Ok(server)
    }

    fn etcd_installed() -> bool {
        Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Two distinct free loopback ports.
    fn free_ports() -> Result<(u16, u16), String> {
        let a = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let b = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string());
        Ok((port(&a)?, port(&b)?))
    }

    fn etcd_healthy(port: u16) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply.contains("\"health\":\"true\"")
    }

    fn start_etcd(dir: PathBuf) -> Result<ServerProcess, String> {
        let (client_port, peer_port) = free_ports()?;
        let log = File::create(dir.join("etcd.log"))
            .map_err(|e| format!("cannot create the etcd log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let data = dir.join("data");
        let child = Command::new("etcd")
            .arg("--name")
            .arg("t")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start etcd: {e}"))?;
        let mut server = ServerProcess {
            system: System::Etcd,
            child,
            endpoint: client,
            dir,
            keep_dir: false,
            _stdout: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !etcd_healthy(client_port) {
            server.check_alive()?;
            if Instant::now() > deadline {
                server.keep_dir = true;
                return Err("etcd start: /health not healthy within 15 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    // ---------------------------------------------------------------------------------------
    // Clients: one code shape for both systems.

    #[derive(Clone)]
    enum Clients {
        Registry(Vec<RegistryClient<Channel>>),
        Etcd(Vec<etcd_client::Client>),
    }

    /// `count` clients, each on its own HTTP/2 connection.
    async fn connect(system: System, endpoint: &str, count: usize) -> Result<Clients, String> {
        match system {
            System::Registry => {
                let mut clients = Vec::with_capacity(count);
                for _ in 0..count {
                    let channel = Endpoint::from_shared(endpoint.to_string())
                        .map_err(|e| format!("registry endpoint {endpoint}: {e}"))?
                        .connect_timeout(RPC_TIMEOUT)
                        .tcp_nodelay(true)
                        .connect()
                        .await
                        .map_err(|e| format!("registry connect {endpoint}: {e}"))?;
                    clients.push(RegistryClient::new(channel).max_decoding_message_size(64 << 20));
                }
                Ok(Clients::Registry(clients))
            }
            System::Etcd => {
                let mut clients = Vec::with_capacity(count);
                for _ in 0..count {
                    let options = ConnectOptions::new().with_connect_timeout(RPC_TIMEOUT);
                    let client = within(
                        "etcd connect",
                        etcd_client::Client::connect([endpoint], Some(options)),
                    )
                    .await?;
                    clients.push(client);
                }
                Ok(Clients::Etcd(clients))
            }
        }
    }

    /// One member's registration: what it needs to heartbeat.
    enum Handle {
        Registry {
            client: RegistryClient<Channel>,
            token: String,
        },
        Etcd {
            lease: LeaseClient,
            id: i64,
            /// The member's keep-alive stream, opened by its first heartbeat.
            keep_alive: Option<Box<(LeaseKeeper, LeaseKeepAliveStream)>>,
        },
    }

    /// Member `i`'s id, shaped as `MemberId::generate` makes them (`{name}-{wall ms hex}-{random
    /// hex}`), with the same amount of randomness, so that snapshots compress as a real
    /// cluster's would (a sequential `bench-000123` compresses far better).
    fn member_id(i: usize) -> String {
        let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Members started over about a day: the wall-clock part varies in its low 27 bits.
        let wall = 0x19a_c000_0000u64 + (z >> 37);
        format!("bench-{i:06}-{wall:x}-{:08x}", z as u32)
    }

    fn member_address(i: usize) -> String {
        format!("127.0.0.1:{}", 10_000 + i % 50_000)
    }

    fn etcd_key(id: &str) -> String {
        format!("{PREFIX}{id}")
    }

    /// What an etcd provider would store: the member's description.
    fn etcd_value(id: &str, i: usize) -> String {
        format!(
            "{{\"id\":\"{id}\",\"address\":\"{}\",\"kinds\":[\"actor\"]}}",
            member_address(i)
        )
    }

    /// Runs one request with the per-request deadline, naming it in the error.
    async fn within<T, E: Display>(
        what: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(RPC_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: no answer within {RPC_TIMEOUT:?}")),
        }
    }

    /// Registers member `i` (registry: Join; etcd: LeaseGrant + Put with the lease).
    async fn register(clients: &Clients, i: usize, id: &str) -> Result<Handle, String> {
        match clients {
            Clients::Registry(cs) => {
                let mut client = cs[i % cs.len()].clone();
                let request = pb::JoinRequest {
                    cluster: CLUSTER.into(),
                    member: Some(pb::Member {
                        id: id.to_string(),
                        address: member_address(i),
                        kinds: vec!["actor".into()],
                        zone: String::new(),
                        metadata: Default::default(),
                    }),
                    role: pb::Role::Member as i32,
                    cluster_token: String::new(),
                    incarnation_secret: String::new(),
                    update_only: false,
                };
                let joined = within("Join", client.join(request)).await?.into_inner();
                Ok(Handle::Registry {
                    client,
                    token: joined.member_token,
                })
            }
            Clients::Etcd(cs) => {
                let c = &cs[i % cs.len()];
                let mut lease = c.lease_client();
                let granted = within("LeaseGrant", lease.grant(TTL_SECS, None)).await?;
                let mut kv = c.kv_client();
                let options = PutOptions::new().with_lease(granted.id());
                within(
                    "Put",
                    kv.put(etcd_key(id), etcd_value(id, i), Some(options)),
                )
                .await?;
                Ok(Handle::Etcd {
                    lease,
                    id: granted.id(),
                    keep_alive: None,
                })
            }
        }
    }

    /// A failed heartbeat; `expired` when the server no longer knows the registration.
    struct Failure {
        expired: bool,
        message: String,
    }

    impl From<String> for Failure {
        fn from(message: String) -> Self {
            Failure {
                expired: false,
                message,
            }
        }
    }

    /// One heartbeat (registry: unary Heartbeat; etcd: one request and its answer on the
    /// member's own LeaseKeepAlive stream, opening it the first time).
    async fn heartbeat(h: &mut Handle) -> Result<(), Failure> {
        match h {
            Handle::Registry { client, token } => {
                let request = pb::HeartbeatRequest {
                    cluster: CLUSTER.into(),
                    member_token: token.clone(),
                };
                match tokio::time::timeout(RPC_TIMEOUT, client.heartbeat(request)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => Err(Failure {
                        expired: status.code() == tonic::Code::NotFound,
                        message: format!("Heartbeat: {status}"),
                    }),
                    Err(_) => Err(format!("Heartbeat: no answer within {RPC_TIMEOUT:?}").into()),
                }
            }
            Handle::Etcd {
                lease,
                id,
                keep_alive,
            } => {
                let result: Result<(), Failure> = match keep_alive {
                    // Opening the stream sends one keep-alive and waits for its answer.
                    None => within("LeaseKeepAlive (open)", lease.keep_alive(*id))
                        .await
                        .map(|pair| *keep_alive = Some(Box::new(pair)))
                        .map_err(|message| Failure {
                            expired: message.contains("lease not found"),
                            message,
                        }),
                    Some(pair) => {
                        let (keeper, stream) = &mut **pair;
                        match within("LeaseKeepAlive (send)", keeper.keep_alive()).await {
                            Err(e) => Err(e.into()),
                            Ok(()) => match within("LeaseKeepAlive (receive)", stream.message())
                                .await
                            {
                                Ok(Some(r)) if r.ttl() > 0 => Ok(()),
                                Ok(Some(_)) => Err(Failure {
                                    expired: true,
                                    message: "LeaseKeepAlive: lease expired (TTL 0)".into(),
                                }),
                                Ok(None) => Err("LeaseKeepAlive: stream closed".to_string().into()),
                                Err(e) => Err(e.into()),
                            },
                        }
                    }
                };
                if result.is_err() {
                    // A late answer must not be taken for the next request's: reopen.
                    *keep_alive = None;
                }
                result
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // The members: register, then heartbeat once a second until told to stop.

    struct Shared {
        clients: Clients,
        handles: Vec<Mutex<Option<Handle>>>,
        mode: AtomicU8,
        register_gate: Semaphore,
        registrations_done: AtomicUsize,
        registration: StdMutex<Samples>,
        steady: StdMutex<Samples>,
        background: StdMutex<Samples>,
        /// Heartbeats during the watch phase (while the watch streams open and fan out).
        watch_heartbeats: StdMutex<Samples>,
        /// What the benchmark is doing now (an index into [`PHASES`]).
        phase: AtomicU8,
        /// Members found expired while heartbeating, per phase.
        expired: [AtomicUsize; PHASES.len()],
        first_expired: StdMutex<Option<String>>,
    }

    /// The phases, for telling when members expired.
    const PHASES: [&str; 6] = [
        "registration",
        "settling",
        "steady",
        "saturation",
        "after saturation",
        "watch",
    ];

    fn set_phase(shared: &Shared, name: &str) {
        let i = PHASES.iter().position(|p| *p == name).unwrap_or(0);
        shared.phase.store(i as u8, Ordering::SeqCst);
    }

    /// Counts an expired member; its handle is dropped (it would have to join again).
    fn note_expired(shared: &Shared, handle: &mut Option<Handle>, i: usize, message: &str) {
        if handle.take().is_some() {
            let phase = shared.phase.load(Ordering::SeqCst) as usize;
            shared.expired[phase.min(PHASES.len() - 1)].fetch_add(1, Ordering::SeqCst);
            lock(&shared.first_expired)
                .get_or_insert_with(|| format!("{} ({}): {message}", member_id(i), PHASES[phase]));
        }
    }

    async fn member(shared: Arc<Shared>, i: usize, deadline: Instant) {
        let id = member_id(i);
        let registered = {
            let Ok(_permit) = shared.register_gate.acquire().await else {
                shared.registrations_done.fetch_add(1, Ordering::SeqCst);
                return;
            };
            let started = Instant::now();
            let result = register(&shared.clients, i, &id).await;
            let mut samples = lock(&shared.registration);
            match result {
                Ok(h) => {
                    samples.ok(started.elapsed());
                    Some(h)
                }
                Err(e) => {
                    samples.err(format!("{id}: {e}"));
                    None
                }
            }
        };
        let ok = registered.is_some();
        *shared.handles[i].lock().await = registered;
        shared.registrations_done.fetch_add(1, Ordering::SeqCst);
        if !ok {
            return;
        }
        // Spread the members' heartbeats over the second.
        let phase = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % 1_000_000;
        let mut next = tokio::time::Instant::now() + Duration::from_micros(phase);
        loop {
            tokio::time::sleep_until(next).await;
            next += HEARTBEAT_EVERY;
            let now = tokio::time::Instant::now();
            while next <= now {
                next += HEARTBEAT_EVERY; // Fell behind: skip, do not burst.
            }
            let mode = shared.mode.load(Ordering::SeqCst);
            if mode == STOP || Instant::now() > deadline {
                return;
            }
            if mode == PAUSE {
                continue;
            }
            let started = Instant::now();
            let result = {
                let mut guard = shared.handles[i].lock().await;
                let Some(h) = guard.as_mut() else { return };
                match heartbeat(h).await {
                    Ok(()) => Ok(()),
                    Err(f) => {
                        if f.expired {
                            note_expired(&shared, &mut guard, i, &f.message);
                        }
                        Err(format!("{id}: {}", f.message))
                    }
                }
            };
            if mode == RECORD {
                lock(&shared.steady).record(started, result);
            } else if PHASES[shared.phase.load(Ordering::SeqCst) as usize] == "watch" {
                lock(&shared.watch_heartbeats).record(started, result);
            } else if let Err(e) = result {
                lock(&shared.background).err(e);
            }
        }
    }

    /// `workers` tasks heartbeating back to back over the registered members for `duration`.
    async fn saturate(
        shared: &Arc<Shared>,
        live: Arc<Vec<usize>>,
        workers: usize,
        duration: Duration,
    ) -> (Stats, f64) {
        if live.is_empty() {
            return (Samples::default().stats(), 0.0);
        }
        let started = Instant::now();
        let end = started + duration;
        let tasks: Vec<JoinHandle<Samples>> = (0..workers)
            .map(|w| {
                let shared = shared.clone();
                let live = live.clone();
                tokio::spawn(async move {
                    let mut samples = Samples::default();
                    let mut k = w % live.len();
                    while Instant::now() < end {
                        let i = live[k];
                        let t = Instant::now();
                        let result = {
                            let mut guard = shared.handles[i].lock().await;
                            match guard.as_mut() {
                                Some(h) => match heartbeat(h).await {
                                    Ok(()) => Ok(()),
                                    Err(f) => {
                                        if f.expired {
                                            note_expired(&shared, &mut guard, i, &f.message);
                                        }
                                        Err(f.message)
                                    }
                                },
                                None => Err("expired earlier".to_string()),
                            }
                        };
                        samples.record(t, result.map_err(|e| format!("{}: {e}", member_id(i))));
                        k = (k + workers) % live.len();
                    }
                    samples
                })
            })
            .collect();
        let mut all = Samples::default();
        for t in tasks {
            match t.await {
                Ok(s) => all.merge(s),
                Err(e) => all.err(format!("saturation worker failed: {e}")),
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let stats = all.stats();
        let rate = stats.count as f64 / secs;
        (stats, rate)
    }

    // ---------------------------------------------------------------------------------------
    // Watch fan-out.

    struct WatchResult {
        watchers: usize,
        open_secs: f64,
        /// CPU while the streams opened.
        open_cpu: Cpu,
        probe_registration_ms: f64,
        latency: Stats,
    }

    async fn watch_registry(
        mut client: RegistryClient<Channel>,
        target: String,
        ready: Arc<AtomicUsize>,
        deadline: tokio::time::Instant,
    ) -> Result<Instant, String> {
        let request = pb::WatchRequest {
            cluster: CLUSTER.into(),
            from_version: 0,
            cluster_token: String::new(),
            epoch: 0,
            // As Shoal's provider asks (SHOAL_BENCH_FRAGMENTS=0: whole snapshots;
            // SHOAL_BENCH_COMPRESS=0: plain members).
            fragments: std::env::var("SHOAL_BENCH_FRAGMENTS").map_or(true, |v| v != "0"),
            accept_encodings: if std::env::var("SHOAL_BENCH_COMPRESS").map_or(true, |v| v != "0") {
                vec![pb::MembersEncoding::Zlib as i32]
            } else {
                Vec::new()
            },
        };
        let mut assembler = shoal::registry::wire::SnapshotAssembler::new(64 << 20);
        // Opening may wait for the server to catch up (a burst of snapshots), so it gets the
        // watch phase's deadline rather than a single request's.
        let mut stream = match tokio::time::timeout_at(deadline, client.watch(request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) => return Err(format!("Watch (open): {e}")),
            Err(_) => return Err("Watch (open): deadline passed".into()),
        };
        /// The next whole message (a fragmented snapshot counts once all of it arrived).
        async fn next(
            stream: &mut tonic::Streaming<pb::WatchResponse>,
            assembler: &mut shoal::registry::wire::SnapshotAssembler,
            deadline: tokio::time::Instant,
        ) -> Result<pb::WatchResponse, String> {
            loop {
                let m = match tokio::time::timeout_at(deadline, stream.message()).await {
                    Ok(Ok(Some(m))) => m,
                    Ok(Ok(None)) => return Err("Watch: stream ended".to_string()),
                    Ok(Err(e)) => return Err(format!("Watch: {e}")),
                    Err(_) => return Err("Watch: deadline passed".to_string()),
                };
                if let Some(whole) = assembler.feed(m).map_err(|e| format!("Watch: {e}"))? {
                    return Ok(whole);
                }
            }
        }
        match next(&mut stream, &mut assembler, deadline).await?.event {
            Some(pb::watch_response::Event::Snapshot(_)) => {}
            _ => return Err("Watch: the first message is not a snapshot".into()),
        }
        ready.fetch_add(1, Ordering::SeqCst);
        loop {
            let msg = next(&mut stream, &mut assembler, deadline).await?;
            let at = Instant::now();
            let seen = match &msg.event {
                Some(pb::watch_response::Event::Update(u)) => {
                    u.joined.iter().any(|m| m.id == target)
                }
                Some(pb::watch_response::Event::Snapshot(s)) => {
                    shoal::registry::wire::snapshot_members(s.clone())
                        .is_ok_and(|ms| ms.iter().any(|m| m.id == target))
                }
                _ => false,
            };
            if seen {
                return Ok(at);
            }
        }
    }

    async fn watch_etcd(
        client: etcd_client::Client,
        target: String,
        ready: Arc<AtomicUsize>,
        deadline: tokio::time::Instant,
    ) -> Result<Instant, String> {
        // SHOAL_BENCH_ETCD_LIST=1: as a real client (Shoal's etcd provider), list the members
        // first and watch from the next revision, so that "ready" means holding the member
        // list, as it does for a registry watcher.
        let mut options = WatchOptions::new().with_prefix();
        if std::env::var("SHOAL_BENCH_ETCD_LIST").is_ok_and(|v| v == "1") {
            let mut kv = client.kv_client();
            let listed = tokio::time::timeout_at(
                deadline,
                kv.get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix())),
            )
            .await
            .map_err(|_| "List: deadline passed".to_string())?
            .map_err(|e| format!("List: {e}"))?;
            let revision = listed.header().map_or(0, |h| h.revision());
            options = options.with_start_revision(revision + 1);
        }
        let mut wc = client.watch_client();
        let mut stream =
            match tokio::time::timeout_at(deadline, wc.watch(PREFIX, Some(options))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(format!("Watch (open): {e}")),
                Err(_) => return Err("Watch (open): deadline passed".into()),
            };
        let mut created = false;
        loop {
            let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => return Err("Watch: stream ended".into()),
                Ok(Err(e)) => return Err(format!("Watch: {e}")),
                Err(_) => return Err("Watch: deadline passed".into()),
            };
            let at = Instant::now();
            if msg.canceled() {
                return Err(format!("Watch: canceled: {}", msg.cancel_reason()));
            }
            if !created {
                if !msg.created() {
                    return Err("Watch: the first message is not the creation".into());
                }
                created = true;
                ready.fetch_add(1, Ordering::SeqCst);
            }
            let seen = msg.events().iter().any(|e| {
                e.event_type() == EventType::Put
                    && e.kv().is_some_and(|kv| kv.key() == target.as_bytes())
            });
            if seen {
                return Ok(at);
            }
        }
    }

    /// A watch stream read to the end, counting its messages; aborted when dropped.
    struct Drain {
        messages: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Drain {
        fn messages(&self) -> usize {
            self.messages.load(Ordering::SeqCst)
        }
    }

    impl Drop for Drain {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Opens `k` registry watch streams whose messages are read and counted, so changes during
    /// registration go out to watchers as they would in a live cluster.
    async fn open_drains(endpoint: &str, k: usize) -> Result<Vec<Drain>, String> {
        let connections = k.div_ceil(WATCHERS_PER_CONNECTION).max(1);
        let Clients::Registry(cs) = connect(System::Registry, endpoint, connections).await? else {
            return Err("registry clients expected".into());
        };
        let mut drains = Vec::new();
        for i in 0..k {
            let mut client = cs[i % cs.len()].clone();
            let request = pb::WatchRequest {
                cluster: CLUSTER.into(),
                ..Default::default()
            };
            let mut stream = client
                .watch(request)
                .await
                .map_err(|e| format!("Watch (drain): {e}"))?
                .into_inner();
            let messages = Arc::new(AtomicUsize::new(0));
            let counted = messages.clone();
            let task = tokio::spawn(async move {
                while let Ok(Some(_)) = stream.message().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            });
            drains.push(Drain { messages, task });
        }
        Ok(drains)
    }

    /// Opens `watchers` watch streams, registers one new member, and times its arrival at each.
    async fn watch_fanout(
        system: System,
        endpoint: &str,
        shared: &Arc<Shared>,
        watchers: usize,
        probe: usize,
        server_pid: u32,
        ticks: f64,
    ) -> Result<WatchResult, String> {
        let connections = watchers.div_ceil(WATCHERS_PER_CONNECTION).max(1);
        let conns = connect(system, endpoint, connections).await?;
        let id = member_id(probe);
        let ready = Arc::new(AtomicUsize::new(0));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let opening = Instant::now();
        let cpu = CpuMeter::start(server_pid, ticks);
        let tasks: Vec<JoinHandle<Result<Instant, String>>> = (0..watchers)
            .map(|k| {
                let ready = ready.clone();
                match &conns {
                    Clients::Registry(cs) => tokio::spawn(watch_registry(
                        cs[k % cs.len()].clone(),
                        id.clone(),
                        ready,
                        deadline,
                    )),
                    Clients::Etcd(cs) => tokio::spawn(watch_etcd(
                        cs[k % cs.len()].clone(),
                        etcd_key(&id),
                        ready,
                        deadline,
                    )),
                }
            })
            .collect();
        let abort_all = |tasks: &[JoinHandle<Result<Instant, String>>]| {
            tasks.iter().for_each(|t| t.abort());
        };
        let open_deadline = Instant::now() + Duration::from_secs(90);
        while ready.load(Ordering::SeqCst) < watchers {
            if let Some(k) = tasks.iter().position(|t| t.is_finished()) {
                abort_all(&tasks);
                let why = match tasks.into_iter().nth(k) {
                    Some(t) => match t.await {
                        Ok(Err(e)) => e,
                        Ok(Ok(_)) => "finished early".into(),
                        Err(e) => e.to_string(),
                    },
                    None => "unknown".into(),
                };
                return Err(format!("watcher {k} failed while opening: {why}"));
            }
            if Instant::now() > open_deadline {
                abort_all(&tasks);
                return Err(format!(
                    "only {} of {watchers} watch streams ready after 90 s",
                    ready.load(Ordering::SeqCst)
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let open_secs = opening.elapsed().as_secs_f64();
        let open_cpu = cpu.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = Instant::now();
        let registered = register(&shared.clients, probe, &id).await;
        let probe_registration_ms = t0.elapsed().as_secs_f64() * 1000.0;
        if let Err(e) = registered {
            abort_all(&tasks);
            return Err(format!("registering the probe member: {e}"));
        }
        let mut samples = Samples::default();
        for t in tasks {
            match t.await {
                Ok(Ok(at)) => samples.ok(at.saturating_duration_since(t0)),
                Ok(Err(e)) => samples.err(e),
                Err(e) => samples.err(format!("watcher task: {e}")),
            }
        }
        Ok(WatchResult {
            watchers,
            open_secs,
            open_cpu,
            probe_registration_ms,
            latency: samples.stats(),
        })
    }

    // ---------------------------------------------------------------------------------------
    // One system at one size.

    struct Report {
        system: System,
        registration_secs: f64,
        registration: Stats,
        memory_after_registration: Memory,
        memory_end: Memory,
        steady_rate: f64,
        steady: Stats,
        steady_cpu: Cpu,
        saturation_rate: f64,
        saturation: Stats,
        saturation_cpu: Cpu,
        watch: Result<WatchResult, String>,
        background: Stats,
        /// Members that expired although they kept heartbeating, per phase.
        expired: Vec<(&'static str, usize)>,
        first_expired: Option<String>,
        watch_heartbeats: Stats,
    }

    async fn bench_one(
        system: System,
        n: usize,
        s: &Settings,
        registry_bin: Option<&Path>,
        ticks: f64,
    ) -> Result<Report, String> {
        let dir = scratch_dir(system, n)?;
        let mut server = match system {
            System::Registry => start_registry(
                registry_bin.ok_or("no registry binary")?,
                dir,
                &s.registry_args,
            )?,
            System::Etcd => start_etcd(dir)?,
        };
        let result = measure(&mut server, system, n, s, ticks).await;
        if result.is_err() {
            server.keep_dir = true;
            let _ = server.check_alive();
        }
        result
    }

    async fn measure(
        server: &mut ServerProcess,
        system: System,
        n: usize,
        s: &Settings,
        ticks: f64,
    ) -> Result<Report, String> {
        let name = system.name();
        let clients = connect(system, &server.endpoint, s.channels).await?;
        let shared = Arc::new(Shared {
            clients,
            handles: (0..n).map(|_| Mutex::new(None)).collect(),
            mode: AtomicU8::new(RUN),
            register_gate: Semaphore::new(s.register_concurrency),
            registrations_done: AtomicUsize::new(0),
            registration: Default::default(),
            steady: Default::default(),
            background: Default::default(),
            watch_heartbeats: Default::default(),
            phase: AtomicU8::new(0),
            expired: Default::default(),
            first_expired: Default::default(),
        });
        // Hard bound on the member tasks' life, whatever happens below.
        let deadline = Instant::now() + Duration::from_secs(900);

        // Registration, with watchers draining their streams if asked (registry only).
        let drains = match system {
            System::Registry if s.registration_watchers > 0 => {
                open_drains(&server.endpoint, s.registration_watchers).await?
            }
            _ => Vec::new(),
        };
        eprintln!(
            "  {name}: registering {n} members ({} watchers)",
            drains.len()
        );
        let started = Instant::now();
        let mut members: Vec<JoinHandle<()>> = (0..n)
            .map(|i| tokio::spawn(member(shared.clone(), i, deadline)))
            .collect();
        let stop = |members: &[JoinHandle<()>]| {
            shared.mode.store(STOP, Ordering::SeqCst);
            members.iter().for_each(|m| m.abort());
        };
        let registration_deadline = Instant::now() + Duration::from_secs(300);
        while shared.registrations_done.load(Ordering::SeqCst) < n {
            if Instant::now() > registration_deadline {
                stop(&members);
                return Err(format!(
                    "registration: only {} of {n} done after 300 s",
                    shared.registrations_done.load(Ordering::SeqCst)
                ));
            }
            if let Err(e) = server.check_alive() {
                stop(&members);
                return Err(format!("registration: {e}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let registration_secs = started.elapsed().as_secs_f64();
        let drained: Vec<usize> = drains.iter().map(|d| d.messages()).collect();
        drop(drains);
        if !drained.is_empty() {
            eprintln!(
                "  {name}: {n} joins in {registration_secs:.2} s ({:.0}/s) with {} watchers, each sent {}-{} messages",
                n as f64 / registration_secs,
                drained.len(),
                drained.iter().min().unwrap_or(&0),
                drained.iter().max().unwrap_or(&0)
            );
        }
        let registration = std::mem::take(&mut *lock(&shared.registration)).stats();
        if registration.count == 0 {
            stop(&members);
            return Err(format!(
                "registration failed for every member: {}",
                registration.first_error.unwrap_or_default()
            ));
        }
        // Let every member reach its heartbeat rhythm (etcd: open its keep-alive stream).
        set_phase(&shared, "settling");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let memory_after_registration = server.memory();

        // Steady load: every member heartbeats once a second.
        eprintln!("  {name}: steady load for {:?}", s.steady);
        let cpu = CpuMeter::start(server.pid(), ticks);
        let window = Instant::now();
        set_phase(&shared, "steady");
        shared.mode.store(RECORD, Ordering::SeqCst);
        tokio::time::sleep(s.steady).await;
        shared.mode.store(RUN, Ordering::SeqCst);
        let window = window.elapsed().as_secs_f64();
        let steady_cpu = cpu.stop();
        // Heartbeats sent in the window may still be answering; give them their deadline.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let steady = std::mem::take(&mut *lock(&shared.steady)).stats();
        let steady_rate = steady.count as f64 / window;
        server.check_alive()?;

        // Saturation: the members pause; fixed workers heartbeat back to back over them.
        eprintln!(
            "  {name}: saturation with {} workers for {:?}",
            s.workers, s.saturation
        );
        shared.mode.store(PAUSE, Ordering::SeqCst);
        set_phase(&shared, "saturation");
        let mut live = Vec::with_capacity(n);
        for (i, h) in shared.handles.iter().enumerate() {
            if h.lock().await.is_some() {
                live.push(i);
            }
        }
        let cpu = CpuMeter::start(server.pid(), ticks);
        let (saturation, saturation_rate) =
            saturate(&shared, Arc::new(live), s.workers, s.saturation).await;
        let saturation_cpu = cpu.stop();
        set_phase(&shared, "after saturation");
        shared.mode.store(RUN, Ordering::SeqCst);
        server.check_alive()?;
        tokio::time::sleep(Duration::from_secs(1)).await;

        // Watch fan-out, under the steady load.
        let watchers = n.min(s.max_watchers);
        eprintln!("  {name}: watch fan-out to {watchers} watchers");
        set_phase(&shared, "watch");
        let watch = watch_fanout(
            system,
            &server.endpoint,
            &shared,
            watchers,
            n,
            server.pid(),
            ticks,
        )
        .await;
        if let Err(e) = &watch {
            eprintln!("  {name}: watch fan-out failed: {e}");
        }
        let memory_end = server.memory();
        server.check_alive()?;

        // Stop the members (each notices within a heartbeat interval plus a request deadline).
        shared.mode.store(STOP, Ordering::SeqCst);
        let _ = tokio::time::timeout(
            HEARTBEAT_EVERY + RPC_TIMEOUT + Duration::from_secs(1),
            futures::future::join_all(members.iter_mut()),
        )
        .await;
        members.iter().for_each(|m| m.abort());
        let background = std::mem::take(&mut *lock(&shared.background)).stats();
        let expired = PHASES
            .iter()
            .zip(&shared.expired)
            .map(|(p, n)| (*p, n.load(Ordering::SeqCst)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let first_expired = lock(&shared.first_expired).take();
        let watch_heartbeats = std::mem::take(&mut *lock(&shared.watch_heartbeats)).stats();
        Ok(Report {
            system,
            registration_secs,
            registration,
            memory_after_registration,
            memory_end,
            steady_rate,
            steady,
            steady_cpu,
            saturation_rate,
            saturation,
            saturation_cpu,
            watch,
            background,
            expired,
            first_expired,
            watch_heartbeats,
        })
    }

    // ---------------------------------------------------------------------------------------
    // Output.

    fn mib(kib: u64) -> String {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    }

    fn ms(v: f64) -> String {
        if v.is_nan() {
            "-".into()
        } else if v < 10.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.1}")
        }
    }

    fn cpu(c: Cpu) -> String {
        format!("{:.2} / {:.2} / {:.2}", c.server, c.client, c.other)
    }

    fn ratio(a: f64, b: f64, what: &str) -> String {
        if a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite() {
            format!("{:.2}× ({what})", a / b)
        } else {
            String::new()
        }
    }

    fn print_table(n: usize, s: &Settings, reports: &[Report]) {
        let reg = reports.iter().find(|r| r.system == System::Registry);
        let etcd = reports.iter().find(|r| r.system == System::Etcd);
        let cols: Vec<&Report> = [reg, etcd].into_iter().flatten().collect();
        if cols.is_empty() {
            return;
        }
        println!();
        println!("### N = {n}");
        println!();
        let header: Vec<&str> = cols.iter().map(|r| r.system.name()).collect();
        let both = reg.is_some() && etcd.is_some();
        println!(
            "| measure | {}{} |",
            header.join(" | "),
            if both { " | ratio" } else { "" }
        );
        println!(
            "|---|{}{}",
            "---|".repeat(cols.len()),
            if both { "---|" } else { "" }
        );
        let row = |label: String, cell: &dyn Fn(&Report) -> String, r: String| {
            let cells: Vec<String> = cols.iter().map(|c| cell(c)).collect();
            if both {
                println!("| {label} | {} | {r} |", cells.join(" | "));
            } else {
                println!("| {label} | {} |", cells.join(" | "));
            }
        };
        let pair = |f: &dyn Fn(&Report) -> f64| match (reg, etcd) {
            (Some(a), Some(b)) => (f(a), f(b)),
            _ => (f64::NAN, f64::NAN),
        };

        let (a, b) = pair(&|r| r.registration.count as f64 / r.registration_secs);
        row(
            format!(
                "registration: {n} members, {} in flight",
                s.register_concurrency
            ),
            &|r| {
                format!(
                    "{:.2} s ({:.0}/s)",
                    r.registration_secs,
                    r.registration.count as f64 / r.registration_secs
                )
            },
            ratio(a, b, "registry/etcd rate"),
        );
        row(
            "registration latency p50 / p99 (ms)".into(),
            &|r| {
                format!(
                    "{} / {}",
                    ms(r.registration.p50_ms),
                    ms(r.registration.p99_ms)
                )
            },
            String::new(),
        );
        let (a, b) = pair(&|r| r.memory_after_registration.rss_kib as f64);
        row(
            "server RSS after registration".into(),
            &|r| mib(r.memory_after_registration.rss_kib),
            ratio(b, a, "etcd/registry"),
        );
        let (a, b) = pair(&|r| r.memory_end.hwm_kib as f64);
        row(
            "server peak RSS (VmHWM, whole run)".into(),
            &|r| mib(r.memory_end.hwm_kib),
            ratio(b, a, "etcd/registry"),
        );
        let (a, b) = pair(&|r| r.steady_rate);
        row(
            format!("steady: heartbeats/s achieved (target {n}/s)"),
            &|r| format!("{:.0}", r.steady_rate),
            ratio(a, b, "registry/etcd"),
        );
        row(
            "steady: latency p50 / p99 (ms)".into(),
            &|r| format!("{} / {}", ms(r.steady.p50_ms), ms(r.steady.p99_ms)),
            String::new(),
        );
        row(
            "steady: CPU server / client / other (cores)".into(),
            &|r| cpu(r.steady_cpu),
            String::new(),
        );
        let (a, b) = pair(&|r| r.saturation_rate);
        row(
            format!("saturation: heartbeats/s, {} workers", s.workers),
            &|r| format!("**{:.0}**", r.saturation_rate),
            ratio(a, b, "registry/etcd"),
        );
        row(
            "saturation: latency p50 / p99 (ms)".into(),
            &|r| format!("{} / {}", ms(r.saturation.p50_ms), ms(r.saturation.p99_ms)),
            String::new(),
        );
        row(
            "saturation: CPU server / client / other (cores)".into(),
            &|r| cpu(r.saturation_cpu),
            String::new(),
        );
        row(
            "watch: streams ready after (s)".into(),
            &|r| match &r.watch {
                Ok(w) => format!("{} in {:.2}", w.watchers, w.open_secs),
                Err(_) => "failed".into(),
            },
            String::new(),
        );
        row(
            "watch open: CPU server / client / other (cores)".into(),
            &|r| match &r.watch {
                Ok(w) => cpu(w.open_cpu),
                Err(_) => "-".into(),
            },
            String::new(),
        );
        row(
            "watch: probe registration took (ms)".into(),
            &|r| match &r.watch {
                Ok(w) => ms(w.probe_registration_ms),
                Err(_) => "-".into(),
            },
            String::new(),
        );
        row(
            "watch fan-out p50 / p99 / max (ms)".into(),
            &|r| match &r.watch {
                Ok(w) => format!(
                    "{} / {} / {}",
                    ms(w.latency.p50_ms),
                    ms(w.latency.p99_ms),
                    ms(w.latency.max_ms)
                ),
                Err(_) => "failed".into(),
            },
            String::new(),
        );
        row(
            "errors: registration / steady / saturation / other heartbeats / watch".into(),
            &|r| {
                format!(
                    "{} / {} / {} / {} / {}",
                    r.registration.errors,
                    r.steady.errors,
                    r.saturation.errors,
                    r.background.errors + r.watch_heartbeats.errors,
                    match &r.watch {
                        Ok(w) => w.latency.errors.to_string(),
                        Err(_) => "failed".into(),
                    }
                )
            },
            String::new(),
        );
        row(
            "heartbeats during the watch phase: p50 / p99 / max (ms)".into(),
            &|r| {
                let w = &r.watch_heartbeats;
                format!("{} / {} / {}", ms(w.p50_ms), ms(w.p99_ms), ms(w.max_ms))
            },
            String::new(),
        );
        row(
            "members expired while heartbeating (phase)".into(),
            &|r| {
                if r.expired.is_empty() {
                    "0".into()
                } else {
                    r.expired
                        .iter()
                        .map(|(p, n)| format!("{n} ({p})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            },
            String::new(),
        );
        for r in &cols {
            if let Some(e) = &r.first_expired {
                println!("\n{} first expiry: {e}", r.system.name());
            }
            let firsts = [
                ("registration", &r.registration.first_error),
                ("steady", &r.steady.first_error),
                ("saturation", &r.saturation.first_error),
                ("other heartbeats", &r.background.first_error),
                ("watch-phase heartbeats", &r.watch_heartbeats.first_error),
            ];
            for (what, e) in firsts {
                if let Some(e) = e {
                    println!("\n{} {what}: first error: {e}", r.system.name());
                }
            }
            match &r.watch {
                Ok(w) => {
                    if let Some(e) = &w.latency.first_error {
                        println!("\n{} watch: first error: {e}", r.system.name());
                    }
                }
                Err(e) => println!("\n{} watch: failed: {e}", r.system.name()),
            }
        }
    }

    pub fn main() -> ExitCode {
        let mut settings = match Settings::from_env() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("registry_load: {e}");
                return ExitCode::FAILURE;
            }
        };
        if settings.systems.contains(&System::Etcd) && !etcd_installed() {
            eprintln!(
                "registry_load: `etcd` is not installed, so only the registry is measured. \
                 Install it with `apt-get update && apt-get install -y etcd-server` (Debian)."
            );
            settings.systems.retain(|&s| s != System::Etcd);
        }
        let registry_bin = if settings.systems.contains(&System::Registry) {
            match registry_binary() {
                Ok(b) => Some(b),
                Err(e) => {
                    eprintln!("registry_load: {e}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            None
        };
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("registry_load: cannot build the tokio runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let ticks = clock_ticks();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "registry_load: sizes {:?}, {} connections, {} saturation workers, steady {:?}, \
             saturation {:?}, at most {} watchers; {cores} cores shared by the client and the \
             server",
            settings.sizes,
            settings.channels,
            settings.workers,
            settings.steady,
            settings.saturation,
            settings.max_watchers
        );
        let mut failed = false;
        runtime.block_on(async {
            for &n in &settings.sizes {
                let mut reports = Vec::new();
                for &system in &settings.systems {
                    eprintln!("N = {n}, {}:", system.name());
                    match bench_one(system, n, &settings, registry_bin.as_deref(), ticks).await {
                        Ok(r) => reports.push(r),
                        Err(e) => {
                            eprintln!("registry_load: {} at N = {n} failed: {e}", system.name());
                            failed = true;
                        }
                    }
                }
                print_table(n, &settings, &reports);
            }
        });
        runtime.shutdown_timeout(Duration::from_secs(5));
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}
