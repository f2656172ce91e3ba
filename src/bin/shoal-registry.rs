//! `shoal-registry`: the bundled registry server.
//!
//! Settings come from flags, `SHOAL_REGISTRY_*` environment variables and an optional TOML file
//! (`--config`), in that order of precedence. See docs/providers/registry.md.

#[cfg(not(madsim))]
mod real {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use anyhow::{Context, Result, bail};
    use clap::Parser;
    use futures::StreamExt;
    use serde::Deserialize;
    use shoal::registry::idle::{IdleIo, IdleLayer, IdleTracker};
    use shoal::registry::{RegistryConfig, RegistryServer};
    use shoal::runtime::TokioClock;
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

    /// The Shoal membership registry.
    #[derive(Parser, Debug)]
    #[command(name = "shoal-registry", version)]
    struct Cli {
        /// TOML settings file (flags and environment variables override it).
        #[arg(long, env = "SHOAL_REGISTRY_CONFIG")]
        config: Option<PathBuf>,
        /// Address to serve gRPC on.
        #[arg(long, env = "SHOAL_REGISTRY_LISTEN")]
        listen: Option<SocketAddr>,
        /// Address to serve Prometheus metrics on (`GET /metrics`); off when unset.
        #[arg(long, env = "SHOAL_REGISTRY_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Registration TTL, like `6s` or `1500ms` [default: 6s].
        #[arg(long, env = "SHOAL_REGISTRY_TTL", value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Heartbeat interval members are told to use [default: a third of the TTL, so two
        /// heartbeats in a row may be lost; at most a third of the TTL].
        #[arg(long, env = "SHOAL_REGISTRY_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
        heartbeat_interval: Option<Duration>,
        /// How often expired registrations are swept.
        #[arg(long, env = "SHOAL_REGISTRY_SWEEP_INTERVAL", value_parser = humantime::parse_duration)]
        sweep_interval: Option<Duration>,
        /// How often a quiet watch carries a progress message.
        #[arg(long, env = "SHOAL_REGISTRY_PROGRESS_INTERVAL", value_parser = humantime::parse_duration)]
        progress_interval: Option<Duration>,
        /// Under load, a cluster's changes go to its watchers at most once per this interval,
        /// coalesced into one update; 0 sends every change at once [default: 10ms; at most the
        /// sweep interval].
        #[arg(long, env = "SHOAL_REGISTRY_PUBLISH_INTERVAL", value_parser = humantime::parse_duration)]
        publish_interval: Option<Duration>,
        /// How long watchers wait for their first snapshot after a start, so members re-join
        /// first [default: 1.5 heartbeat intervals; 0 turns it off].
        #[arg(long, env = "SHOAL_REGISTRY_STARTUP_GRACE", value_parser = humantime::parse_duration)]
        startup_grace: Option<Duration>,
        /// Most members per cluster.
        #[arg(long, env = "SHOAL_REGISTRY_MAX_MEMBERS")]
        max_members_per_cluster: Option<usize>,
        /// Most clusters that were not named with --cluster or --cluster-token (registered or
        /// watched; named clusters are always admitted) [default: 1024].
        #[arg(long, env = "SHOAL_REGISTRY_MAX_CLUSTERS")]
        max_clusters: Option<usize>,
        /// A cluster this registry serves: always admitted, whatever --max-clusters (repeatable).
        #[arg(
            long = "cluster",
            env = "SHOAL_REGISTRY_CLUSTERS",
            value_delimiter = ','
        )]
        clusters: Vec<String>,
        /// Refuse every cluster not named with --cluster or --cluster-token.
        #[arg(long, env = "SHOAL_REGISTRY_ONLY_NAMED_CLUSTERS")]
        only_named_clusters: bool,
        /// Most client registrations per cluster [default: 10000].
        #[arg(long, env = "SHOAL_REGISTRY_MAX_CLIENTS")]
        max_clients_per_cluster: Option<usize>,
        /// Most registrations across all clusters [default: 100000].
        #[arg(long, env = "SHOAL_REGISTRY_MAX_REGISTRATIONS")]
        max_registrations: Option<usize>,
        /// Most watch streams per cluster [default: 20000].
        #[arg(long, env = "SHOAL_REGISTRY_MAX_WATCHERS_PER_CLUSTER")]
        max_watchers_per_cluster: Option<usize>,
        /// Most watch streams across all clusters [default: 100000].
        #[arg(long, env = "SHOAL_REGISTRY_MAX_WATCHERS")]
        max_watchers: Option<usize>,
        /// Largest member description, encoded, in bytes [default: 16384].
        #[arg(long, env = "SHOAL_REGISTRY_MAX_MEMBER_BYTES")]
        max_member_bytes: Option<usize>,
        /// Largest encoded snapshot of one cluster, in bytes; Shoal's clients accept up to 64 MiB
        /// [default: 33554432].
        #[arg(long, env = "SHOAL_REGISTRY_MAX_SNAPSHOT_BYTES")]
        max_snapshot_bytes: Option<usize>,
        /// Send snapshots larger than this in fragments of this size to watchers that accept
        /// them (Shoal's provider does), so a burst of new watchers costs one copy of the
        /// snapshot, not one each; 0 sends them whole [default: 16384].
        #[arg(long, env = "SHOAL_REGISTRY_SNAPSHOT_FRAGMENT_BYTES")]
        snapshot_fragment_bytes: Option<usize>,
        /// Compress snapshots whose members encode to more than this (zlib, once per version)
        /// for watchers that accept it (Shoal's provider does): a burst of new watchers moves
        /// about a third of the bytes; 0 never compresses [default: 4096].
        #[arg(long, env = "SHOAL_REGISTRY_SNAPSHOT_COMPRESS_BYTES")]
        snapshot_compress_bytes: Option<usize>,
        /// Most concurrent HTTP/2 streams per connection (watches and calls) [default: 1024].
        #[arg(
            long,
            env = "SHOAL_REGISTRY_MAX_CONCURRENT_STREAMS",
            default_value_t = 1024
        )]
        max_concurrent_streams: u32,
        /// Close a connection that carries no call for this long (HTTP/2 pings do not count; a
        /// watch stream or a heartbeat every few seconds does); 0 turns it off [default: 5m].
        #[arg(long, env = "SHOAL_REGISTRY_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
        idle_timeout: Duration,
        /// Deadline of every unary call on the server side [default: 10s].
        #[arg(long, env = "SHOAL_REGISTRY_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
        request_timeout: Duration,
        /// Most kinds per member.
        #[arg(long, env = "SHOAL_REGISTRY_MAX_KINDS")]
        max_kinds: Option<usize>,
        /// Longest cluster name, kind, zone or metadata key, in bytes.
        #[arg(long, env = "SHOAL_REGISTRY_MAX_NAME_LEN")]
        max_name_len: Option<usize>,
        /// Largest request, in bytes.
        #[arg(long, env = "SHOAL_REGISTRY_MAX_MESSAGE_BYTES")]
        max_message_bytes: Option<usize>,
        /// PEM certificate chain: serve TLS.
        #[arg(long, env = "SHOAL_REGISTRY_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of the certificate.
        #[arg(long, env = "SHOAL_REGISTRY_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// How long a TLS client may take to complete its handshake before the connection is
        /// closed (a client that connects and sends nothing holds no socket for longer).
        #[arg(long, env = "SHOAL_REGISTRY_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
        tls_handshake_timeout: Duration,
        /// PEM CA bundle: require client certificates signed by it (mTLS).
        #[arg(long, env = "SHOAL_REGISTRY_CLIENT_CA", requires = "tls_cert")]
        client_ca: Option<PathBuf>,
        /// A cluster's shared secret, as CLUSTER=TOKEN (repeatable; visible in `ps`: prefer
        /// --cluster-token-file or the environment variable).
        #[arg(long = "cluster-token", env = "SHOAL_REGISTRY_CLUSTER_TOKENS", hide_env_values = true, value_delimiter = ',', value_parser = parse_token)]
        cluster_tokens: Vec<(String, String)>,
        /// A file of cluster secrets, one CLUSTER=TOKEN per line (`#` comments and blank lines
        /// are skipped).
        #[arg(long, env = "SHOAL_REGISTRY_CLUSTER_TOKEN_FILE")]
        cluster_token_file: Option<PathBuf>,
    }

    /// How long a SIGTERM waits for open connections to finish.
    const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

    fn parse_token(s: &str) -> Result<(String, String), String> {
        match s.split_once('=') {
            Some((c, t)) if !c.is_empty() && !t.is_empty() => Ok((c.to_string(), t.to_string())),
            _ => Err(format!("expected CLUSTER=TOKEN, got {s:?}")),
        }
    }

    /// Reads a token file: `CLUSTER=TOKEN` lines, `#` comments and blank lines skipped.
    fn read_token_file(path: &PathBuf) -> Result<Vec<(String, String)>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--cluster-token-file: cannot read {}", path.display()))?;
        text.lines()
            .enumerate()
            .map(|(n, l)| (n + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
            .map(|(n, l)| {
                parse_token(l).map_err(|_| {
                    anyhow::anyhow!(
                        "--cluster-token-file: {} line {n}: expected CLUSTER=TOKEN",
                        path.display()
                    )
                })
            })
            .collect()
    }

    /// The TOML file: server settings plus the registry's own.
    #[derive(Deserialize, Debug, Default)]
    #[serde(default, deny_unknown_fields)]
    struct FileConfig {
        listen: Option<SocketAddr>,
        metrics_listen: Option<SocketAddr>,
        tls: Option<TlsFile>,
        registry: RegistryConfig,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct TlsFile {
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
    }

    struct Settings {
        idle_timeout: Duration,
        tls_handshake_timeout: Duration,
        max_concurrent_streams: u32,
        request_timeout: Duration,
        listen: SocketAddr,
        metrics_listen: Option<SocketAddr>,
        tls: Option<TlsFile>,
        registry: RegistryConfig,
    }

    fn settings(cli: Cli) -> Result<Settings> {
        let file: FileConfig = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--config: cannot read {}", path.display()))?;
                toml::from_str(&text).with_context(|| {
                    format!("--config: {} is not a valid settings file", path.display())
                })?
            }
            None => FileConfig::default(),
        };
        let mut r = file.registry;
        if let Some(v) = cli.ttl {
            r.ttl = v;
        }
        if let Some(v) = cli.heartbeat_interval {
            r.heartbeat_interval = Some(v);
        }
        if let Some(v) = cli.sweep_interval {
            r.sweep_interval = v;
        }
        if let Some(v) = cli.progress_interval {
            r.progress_interval = v;
        }
        if let Some(v) = cli.publish_interval {
            r.publish_interval = v;
        }
        if let Some(v) = cli.startup_grace {
            r.startup_grace = Some(v);
        }
        if let Some(v) = cli.max_members_per_cluster {
            r.limits.max_members_per_cluster = v;
        }
        if let Some(v) = cli.max_clusters {
            r.limits.max_clusters = v;
        }
        r.clusters.extend(cli.clusters.iter().cloned());
        r.only_named_clusters |= cli.only_named_clusters;
        let limits = [
            (
                cli.max_clients_per_cluster,
                &mut r.limits.max_clients_per_cluster,
            ),
            (cli.max_registrations, &mut r.limits.max_registrations),
            (
                cli.max_watchers_per_cluster,
                &mut r.limits.max_watchers_per_cluster,
            ),
            (cli.max_watchers, &mut r.limits.max_watchers),
            (cli.max_member_bytes, &mut r.limits.max_member_bytes),
            (cli.max_snapshot_bytes, &mut r.limits.max_snapshot_bytes),
            (
                cli.snapshot_fragment_bytes,
                &mut r.limits.snapshot_fragment_bytes,
            ),
            (
                cli.snapshot_compress_bytes,
                &mut r.limits.snapshot_compress_bytes,
            ),
        ];
        for (flag, setting) in limits {
            if let Some(v) = flag {
                *setting = v;
            }
        }
        if let Some(v) = cli.max_kinds {
            r.limits.member.max_kinds = v;
        }
        if let Some(v) = cli.max_name_len {
            r.limits.member.max_name_len = v;
            r.limits.max_cluster_name_len = v;
        }
        if let Some(v) = cli.max_message_bytes {
            r.limits.max_message_bytes = v;
        }
        if let Some(path) = &cli.cluster_token_file {
            r.cluster_tokens.extend(read_token_file(path)?);
        }
        let tokens: BTreeMap<String, String> = cli.cluster_tokens.into_iter().collect();
        r.cluster_tokens.extend(tokens);
        if let Err(e) = r.validate() {
            bail!(
                "invalid settings: {e} (check the flags of the same name, like --ttl, --heartbeat-interval or --max-snapshot-bytes, and the settings file)"
            );
        }
        let tls = match (cli.tls_cert, cli.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFile {
                cert,
                key,
                client_ca: cli.client_ca,
            }),
            _ => file.tls,
        };
        Ok(Settings {
            idle_timeout: cli.idle_timeout,
            tls_handshake_timeout: cli.tls_handshake_timeout,
            max_concurrent_streams: cli.max_concurrent_streams,
            request_timeout: cli.request_timeout,
            listen: cli
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:7600".parse().expect("valid default")),
            metrics_listen: cli.metrics_listen.or(file.metrics_listen),
            tls,
            registry: r,
        })
    }

    fn tls_config(tls: &TlsFile, handshake_timeout: Duration) -> Result<ServerTlsConfig> {
        let read = |flag: &str, p: &PathBuf| {
            std::fs::read(p).with_context(|| format!("{flag}: cannot read {}", p.display()))
        };
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read("--tls-cert", &tls.cert)?,
                read("--tls-key", &tls.key)?,
            ))
            .timeout(handshake_timeout);
        if let Some(ca) = &tls.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read("--client-ca", ca)?));
        }
        Ok(config)
    }

    pub async fn main() -> Result<()> {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
        let s = settings(Cli::parse())?;
        let server = RegistryServer::new(s.registry.clone(), TokioClock::shared())
            .map_err(anyhow::Error::msg)?;

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<shoal::registry::RegistryGrpcService>()
            .await;

        if let Some(addr) = s.metrics_listen {
            let mut registry = prometheus_client::registry::Registry::with_prefix("shoal");
            server.metrics().register(&mut registry);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-listen: cannot bind {addr}"))?;
            tracing::info!(%addr, "serving metrics");
            tokio::spawn(shoal::metrics::serve_http(
                listener,
                std::sync::Arc::new(registry),
            ));
        }

        // Off: a timeout nobody reaches (a hundred years).
        let idle = if s.idle_timeout.is_zero() {
            Duration::from_secs(100 * 365 * 24 * 3600)
        } else {
            s.idle_timeout
        };
        let tracker = IdleTracker::new(idle, server.metrics().idle_connections_closed.clone());
        let mut builder = Server::builder()
            .layer(IdleLayer::new(tracker.clone()))
            .max_concurrent_streams(Some(s.max_concurrent_streams))
            .timeout(s.request_timeout)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .tcp_nodelay(true);
        if let Some(tls) = &s.tls {
            builder = builder
                .tls_config(tls_config(tls, s.tls_handshake_timeout)?)
                .context("invalid TLS settings")?;
        }
        let listener = tokio::net::TcpListener::bind(s.listen)
            .await
            .with_context(|| format!("--listen: cannot bind {}", s.listen))?;
        let local = listener.local_addr()?;
        let sweeper = server.spawn_tasks();
        tracing::info!(addr = %local, ttl = ?s.registry.ttl, heartbeat_interval = ?s.registry.heartbeat(), startup_grace = ?s.registry.grace(), tls = s.tls.is_some(), "registry serving");
        // A line on stdout tells scripts and tests the bound address (useful with port 0).
        println!("listening on {local}");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serve = builder
            .add_service(health_service)
            .add_service(server.service())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(30)))
                    .map(move |conn| conn.map(|socket| IdleIo::new(socket, tracker.clone()))),
                async {
                    let _ = stop_rx.await;
                },
            );
        tokio::pin!(serve);
        tokio::select! {
            biased;
            result = &mut serve => result.context("serving")?,
            _ = shoal::runtime::shutdown_signal() => {
                // Stop accepting, end every watch stream (clients reconnect elsewhere or
                // later), let in-flight calls finish, and give up after the drain deadline.
                health_reporter.set_not_serving::<shoal::registry::RegistryGrpcService>().await;
                server.close_watches();
                let _ = stop_tx.send(());
                match tokio::time::timeout(DRAIN_DEADLINE, &mut serve).await {
                    Ok(result) => result.context("serving")?,
                    Err(_) => tracing::warn!(deadline = ?DRAIN_DEADLINE, "connections still open after the drain deadline; exiting anyway"),
                }
            }
        }
        sweeper.abort();
        tracing::info!("registry stopped");
        Ok(())
    }
}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match real::main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-registry: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(madsim)]
fn main() {
    eprintln!(
        "shoal-registry is built for production; in simulation, run RegistryServer on a node"
    );
}
