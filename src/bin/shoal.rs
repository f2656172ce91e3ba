//! `shoal`: join a registry as a member, or print a cluster's topology.

#[cfg(not(madsim))]
mod real {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use anyhow::{Context, Result, bail};
    use clap::{Args, Parser, Subcommand};
    use serde_json::json;
    use shoal::provider::PartitionService;
    use shoal::registry::{RegistryProvider, RegistryProviderConfig, pb, wire};
    use shoal::runtime::TokioClock;
    use shoal::{ClusterEvent, ClusterProvider, ClusterProviderContext, ClusterTopology};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    #[derive(Parser, Debug)]
    #[command(name = "shoal", version, about = "Shoal cluster membership")]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand, Debug)]
    enum Command {
        /// Join a cluster through a registry and print every topology change as a JSON line.
        Member(MemberArgs),
        /// Print a cluster's current members.
        Topology(TopologyArgs),
    }

    #[derive(Args, Debug)]
    struct Connection {
        /// Registry URL, like http://127.0.0.1:7600 (https:// with --ca).
        #[arg(long, env = "SHOAL_REGISTRY")]
        registry: String,
        /// Cluster name.
        #[arg(long, env = "SHOAL_CLUSTER")]
        cluster: String,
        /// The cluster's shared secret, if the registry requires one (visible in `ps`: prefer
        /// --cluster-token-file or the SHOAL_CLUSTER_TOKEN environment variable).
        #[arg(long, env = "SHOAL_CLUSTER_TOKEN", hide_env_values = true)]
        cluster_token: Option<String>,
        /// A file holding the cluster's shared secret (surrounding whitespace ignored).
        #[arg(
            long,
            env = "SHOAL_CLUSTER_TOKEN_FILE",
            conflicts_with = "cluster_token"
        )]
        cluster_token_file: Option<PathBuf>,
        /// PEM CA certificate to verify the registry's TLS certificate.
        #[arg(long, env = "SHOAL_CA")]
        ca: Option<PathBuf>,
        /// PEM client certificate, for a registry that requires mTLS.
        #[arg(long, env = "SHOAL_CERT", requires = "key")]
        cert: Option<PathBuf>,
        /// PEM private key of the client certificate.
        #[arg(long, env = "SHOAL_KEY", requires = "cert")]
        key: Option<PathBuf>,
        /// TLS server name to verify (defaults to the URL's host).
        #[arg(long)]
        tls_domain: Option<String>,
        /// Deadline of each call to the registry.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    }

    impl Connection {
        fn token(&self) -> Result<Option<String>> {
            let Some(path) = &self.cluster_token_file else {
                return Ok(self.cluster_token.clone());
            };
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--cluster-token-file: cannot read {}", path.display()))?;
            let token = text.trim();
            if token.is_empty() {
                bail!("--cluster-token-file: {} is empty", path.display());
            }
            Ok(Some(token.to_string()))
        }

        fn tls(&self) -> Result<Option<ClientTlsConfig>> {
            let Some(ca) = &self.ca else { return Ok(None) };
            let pem =
                std::fs::read(ca).with_context(|| format!("--ca: cannot read {}", ca.display()))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("--cert: cannot read {}", cert.display()))?;
                let key = std::fs::read(key)
                    .with_context(|| format!("--key: cannot read {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(d) = &self.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            Ok(Some(tls))
        }

        fn provider_config(&self) -> Result<RegistryProviderConfig> {
            let mut c = RegistryProviderConfig::new(self.registry.clone());
            c.rpc_timeout = self.timeout;
            c.connect_timeout = self.timeout;
            c.cluster_token = self.token()?;
            c.tls = self.tls()?;
            Ok(c)
        }
    }

    #[derive(Args, Debug)]
    struct MemberArgs {
        #[command(flatten)]
        conn: Connection,
        /// host:port other members use to reach this node.
        #[arg(long)]
        advertise: String,
        /// Address to serve the partition service on (defaults to --advertise).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Comma-separated kinds this member hosts.
        #[arg(long, value_delimiter = ',', default_value = "")]
        kinds: Vec<String>,
        /// Failure domain.
        #[arg(long)]
        zone: Option<String>,
    }

    #[derive(Args, Debug)]
    struct TopologyArgs {
        #[command(flatten)]
        conn: Connection,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// How long to wait for the registry's first snapshot (a registry that just started
        /// holds it back for its startup grace).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        wait: Duration,
    }

    fn member_json(m: &shoal::Member) -> serde_json::Value {
        json!({"id": m.id, "address": m.address, "kinds": m.kinds, "zone": m.zone})
    }

    fn snapshot_json(t: &ClusterTopology) -> serde_json::Value {
        json!({"event": "snapshot", "cluster": t.cluster_name(), "version": t.version(),
               "epoch": format!("{:016x}", t.epoch()),
               "members": t.members().iter().map(|m| member_json(m)).collect::<Vec<_>>()})
    }

    async fn member(args: MemberArgs) -> Result<()> {
        let kinds: Vec<String> = args.kinds.into_iter().filter(|k| !k.is_empty()).collect();
        let mut ctx = ClusterProviderContext::new(
            &args.conn.cluster,
            &args.advertise,
            kinds,
            TokioClock::shared(),
        )
        .context("invalid --cluster, --advertise or --kinds")?;
        if let Some(z) = args.zone {
            ctx = ctx.with_zone(z);
        }
        let listen: SocketAddr = match args.listen {
            Some(l) => l,
            None => args
                .advertise
                .parse()
                .context("--advertise is not an ip:port to listen on; give --listen")?,
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen: cannot bind {listen}"))?;
        let partition = PartitionService::new(ctx.partition_manager.clone()).server();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(partition)
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener)
                        .with_nodelay(Some(true))
                        .with_keepalive(Some(Duration::from_secs(30))),
                ),
        );

        let mut events = ctx.events.subscribe();
        let printer = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ClusterEvent::TopologyChanged { topology, report }) => {
                        let mut line = snapshot_json(&topology);
                        line["joined"] =
                            json!(report.diff.joined.iter().map(|m| &m.id).collect::<Vec<_>>());
                        line["left"] =
                            json!(report.diff.left.iter().map(|m| &m.id).collect::<Vec<_>>());
                        println!("{line}");
                    }
                    Ok(ClusterEvent::MembershipLost {
                        member,
                        reason,
                        version,
                        ..
                    }) => {
                        println!(
                            "{}",
                            json!({"event": "membership-lost", "member": member,
                                   "reason": reason.to_string(), "version": version})
                        );
                    }
                    Ok(ClusterEvent::MembershipRestored {
                        member,
                        previous,
                        version,
                        ..
                    }) => {
                        println!(
                            "{}",
                            json!({"event": "membership-restored", "member": member.id,
                                   "previous": previous, "version": version})
                        );
                    }
                    Ok(_) => {}
                    Err(shoal::SubscriptionError::Lagged { missed }) => {
                        tracing::warn!(missed, "event printer lagged");
                    }
                    Err(shoal::SubscriptionError::Closed) => break,
                }
            }
        });

        let provider = RegistryProvider::new(args.conn.provider_config()?);
        provider.start_member(ctx.clone()).await.with_context(|| {
            format!(
                "cannot join cluster {:?} at registry {}",
                args.conn.cluster, args.conn.registry
            )
        })?;
        tracing::info!(member = %ctx.member.id, "joined; press Ctrl-C or send SIGTERM to leave");
        shoal::runtime::shutdown_signal().await;
        provider.shutdown(true).await.context("leaving")?;
        printer.abort();
        Ok(())
    }

    async fn topology(args: TopologyArgs) -> Result<()> {
        let conn = &args.conn;
        let mut endpoint = Endpoint::from_shared(conn.registry.clone())
            .with_context(|| format!("--registry: {:?} is not a URL", conn.registry))?
            .connect_timeout(conn.timeout);
        if let Some(tls) = conn.tls()? {
            endpoint = endpoint.tls_config(tls).context("invalid TLS settings")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach the registry at {}", conn.registry))?;
        let mut client = pb::registry_client::RegistryClient::new(channel)
            .max_decoding_message_size(shoal::registry::MAX_DECODE_BYTES);
        let req = pb::WatchRequest {
            cluster: conn.cluster.clone(),
            from_version: 0,
            cluster_token: conn.token()?.unwrap_or_default(),
            epoch: 0,
        };
        let topology = tokio::time::timeout(args.wait, async {
            let mut stream = client.watch(req).await?.into_inner();
            loop {
                match stream.message().await? {
                    Some(msg) => {
                        if let Ok(Some(t)) = wire::next_topology(&conn.cluster, None, msg) {
                            return Ok::<_, tonic::Status>(t);
                        }
                    }
                    None => {
                        return Err(tonic::Status::unavailable("the registry closed the stream"));
                    }
                }
            }
        })
        .await
        .with_context(|| format!("no topology from {} within {:?}", conn.registry, args.wait))?
        .map_err(|s| anyhow::anyhow!("registry refused: {:?}: {}", s.code(), s.message()))?;
        if args.json {
            println!("{}", snapshot_json(&topology));
        } else {
            println!(
                "cluster {} version {} ({} members)",
                topology.cluster_name(),
                topology.version(),
                topology.len()
            );
            println!("{:<40} {:<24} {:<10} KINDS", "ID", "ADDRESS", "ZONE");
            for m in topology.members() {
                let kinds: Vec<&str> = m.kinds.iter().map(String::as_str).collect();
                println!(
                    "{:<40} {:<24} {:<10} {}",
                    m.id,
                    m.address,
                    m.zone.as_deref().unwrap_or("-"),
                    kinds.join(",")
                );
            }
        }
        Ok(())
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
        match Cli::parse().command {
            Command::Member(a) => member(a).await,
            Command::Topology(a) => {
                if a.conn.cluster.is_empty() {
                    bail!("--cluster must not be empty");
                }
                topology(a).await
            }
        }
    }
}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match real::main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(madsim)]
fn main() {
    eprintln!("the shoal CLI is built for production, not for simulation");
}
