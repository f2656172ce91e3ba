//! `shoal`: join a cluster as a member, or print its topology, through the bundled registry
//! (`--registry URL`), the Kubernetes API (`--kubernetes`) or etcd (`--etcd URL`).

#[cfg(not(madsim))]
mod real {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use anyhow::{Context, Result, anyhow, bail};
    use clap::{Args, Parser, Subcommand};
    use serde_json::json;
    use shoal::etcd::client::{EtcdClient, EtcdConnection, EtcdTls};
    use shoal::etcd::{EtcdProvider, EtcdProviderConfig};
    use shoal::kubernetes::kube_rs::KubeRsApi;
    use shoal::kubernetes::{KubernetesProvider, KubernetesProviderConfig};

    use shoal::activation::{ActivationConfig, ActivationNode, Actor, ActorKind, Deactivation};
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
        /// Join a cluster and print every topology change as a JSON line.
        Member(MemberArgs),
        /// Print a cluster's current members.
        Topology(TopologyArgs),
        /// Call a virtual-actor identity on the member that owns it (members started with
        /// `--actors`) and print the answer as JSON.
        Call(CallArgs),
    }

    #[derive(Args, Debug)]
    struct Connection {
        /// Registry URL, like http://127.0.0.1:7600 (https:// with --ca).
        #[arg(long, env = "SHOAL_REGISTRY")]
        registry: Option<String>,
        /// Use the Kubernetes API instead of a registry: one coordination.k8s.io Lease per
        /// member in --namespace (in a Pod: its service account; outside: the kubeconfig).
        #[arg(long, conflicts_with_all = ["cluster_token", "cluster_token_file", "ca", "cert", "key", "tls_domain", "etcd"])]
        kubernetes: bool,
        /// Use etcd instead of a registry: its client URLs, comma-separated (like
        /// http://127.0.0.1:2379; https:// with --ca, and --cert/--key for mTLS).
        #[arg(long, env = "SHOAL_ETCD", value_delimiter = ',', conflicts_with_all = ["cluster_token", "cluster_token_file"])]
        etcd: Vec<String>,
        /// etcd: the key prefix (members live under <prefix>/<cluster>/members/).
        #[arg(long, default_value = "/shoal")]
        etcd_prefix: String,
        /// etcd: user name, when etcd has authentication on.
        #[arg(long, env = "SHOAL_ETCD_USER", requires = "etcd_password")]
        etcd_user: Option<String>,
        /// etcd: password (visible in `ps`: prefer the SHOAL_ETCD_PASSWORD environment variable).
        #[arg(
            long,
            env = "SHOAL_ETCD_PASSWORD",
            hide_env_values = true,
            requires = "etcd_user"
        )]
        etcd_password: Option<String>,
        /// Kubernetes: the namespace of the Leases (in a Pod, the downward API's POD_NAMESPACE).
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: Option<String>,
        /// Kubernetes: a headless Service whose serving endpoints gate membership.
        #[arg(long, env = "SHOAL_SERVICE")]
        service: Option<String>,
        /// Kubernetes: the Lease duration; etcd: the lease TTL (renewed every third of it; a
        /// crashed member is gone after about this long).
        #[arg(long, env = "SHOAL_LEASE_DURATION", value_parser = humantime::parse_duration)]
        lease_duration: Option<Duration>,
        /// Kubernetes: how often a member renews its Lease (default: a third of the Lease
        /// duration; must be below it).
        #[arg(long, env = "SHOAL_RENEW_INTERVAL", value_parser = humantime::parse_duration)]
        renew_interval: Option<Duration>,
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
        /// Deadline of each call to the registry or the Kubernetes API.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    }

    /// Where membership is kept.
    enum Backend<'a> {
        Registry(&'a str),
        Kubernetes,
        Etcd(&'a [String]),
    }

    impl Connection {
        fn backend(&self) -> Result<Backend<'_>> {
            let etcd = !self.etcd.is_empty();
            match (&self.registry, self.kubernetes, etcd) {
                (_, true, _) => Ok(Backend::Kubernetes),
                (Some(_), false, true) => bail!("give one of --registry and --etcd, not both"),
                (None, false, true) => Ok(Backend::Etcd(&self.etcd)),
                (Some(url), false, false) => Ok(Backend::Registry(url)),
                (None, false, false) => bail!("give --registry URL, --etcd URL or --kubernetes"),
            }
        }

        /// The registry URL (for messages).
        fn registry_url(&self) -> &str {
            self.registry.as_deref().unwrap_or_default()
        }

        /// The Kubernetes provider's settings: the flags, else the downward API's variables
        /// (POD_NAME and POD_UID name the Pod that owns the Lease).
        fn kubernetes_config(&self) -> Result<KubernetesProviderConfig> {
            let namespace = self
                .namespace
                .clone()
                .filter(|n| !n.is_empty())
                .context("--namespace: not given, and POD_NAMESPACE is not set")?;
            let service = self.service.clone().filter(|s| !s.is_empty());
            let mut c = KubernetesProviderConfig::from_vars(|name| match name {
                "POD_NAMESPACE" => Some(namespace.clone()),
                "SHOAL_SERVICE" => service.clone(),
                "SHOAL_LEASE_DURATION" | "SHOAL_RENEW_INTERVAL" => None,
                other => std::env::var(other).ok(),
            })
            .map_err(|e| anyhow!("--kubernetes settings: {e}"))?;
            if let Some(d) = self.lease_duration {
                c.lease_duration = d;
            }
            if let Some(d) = self.renew_interval {
                c.renew_interval = Some(d);
            }
            c.request_timeout = self.timeout;
            c.validate()
                .map_err(|e| anyhow!("--lease-duration, --renew-interval or --timeout: {e}"))?;
            Ok(c)
        }

        async fn kubernetes_provider(&self) -> Result<KubernetesProvider> {
            let config = self.kubernetes_config()?;
            let api = KubeRsApi::from_environment()
                .await
                .map_err(|e| anyhow!("--kubernetes: {e}"))?;
            Ok(KubernetesProvider::new(config, std::sync::Arc::new(api)))
        }

        /// The etcd provider's settings.
        fn etcd_config(&self) -> Result<EtcdProviderConfig> {
            if self.renew_interval.is_some() {
                bail!(
                    "--renew-interval applies to --kubernetes only (etcd keeps its lease alive every third of --lease-duration)"
                );
            }
            let mut c = EtcdProviderConfig {
                prefix: self.etcd_prefix.clone(),
                request_timeout: self.timeout,
                ..EtcdProviderConfig::default()
            };
            if let Some(d) = self.lease_duration {
                c.ttl = d;
            }
            c.validate()
                .map_err(|e| anyhow!("--etcd-prefix, --lease-duration or --timeout: {e}"))?;
            Ok(c)
        }

        async fn etcd_provider(&self, endpoints: &[String]) -> Result<EtcdProvider> {
            let config = self.etcd_config()?;
            for e in endpoints {
                let ok = e.starts_with("http://") || e.starts_with("https://");
                if !ok || e.parse::<http::Uri>().is_err() {
                    bail!("--etcd: {e:?} is not an http:// or https:// URL");
                }
            }
            let tls = match &self.ca {
                None => None,
                Some(ca) => Some(EtcdTls {
                    ca: std::fs::read(ca)
                        .with_context(|| format!("--ca: cannot read {}", ca.display()))?,
                    identity: match (&self.cert, &self.key) {
                        (Some(c), Some(k)) => Some((
                            std::fs::read(c)
                                .with_context(|| format!("--cert: cannot read {}", c.display()))?,
                            std::fs::read(k)
                                .with_context(|| format!("--key: cannot read {}", k.display()))?,
                        )),
                        _ => None,
                    },
                    domain: self.tls_domain.clone(),
                }),
            };
            let connection = EtcdConnection {
                endpoints: endpoints.to_vec(),
                user: self.etcd_user.clone().zip(self.etcd_password.clone()),
                tls,
                connect_timeout: self.timeout,
            };
            let client = EtcdClient::connect(&connection)
                .await
                .map_err(|e| anyhow!("--etcd: {e}"))?;
            Ok(EtcdProvider::new(config, std::sync::Arc::new(client)))
        }

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
            let mut c = RegistryProviderConfig::new(self.registry_url().to_string());
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
        #[arg(long, required_unless_present = "port")]
        advertise: Option<String>,
        /// With --kubernetes in a Pod: advertise POD_IP (the downward API's status.podIP) and
        /// this port.
        #[arg(long, conflicts_with = "advertise", requires = "kubernetes")]
        port: Option<u16>,
        /// Address to serve the partition service on (defaults to --advertise).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Comma-separated kinds this member hosts.
        #[arg(long, value_delimiter = ',', default_value = "")]
        kinds: Vec<String>,
        /// Failure domain.
        #[arg(long)]
        zone: Option<String>,
        /// Host the built-in counter actor for --kinds: each identity counts its calls (the
        /// count moves with it to its next owner), activations and deactivations are printed.
        #[arg(long)]
        actors: bool,
        /// With --actors: how long a moved identity may finish its calls before it is let go.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        drain: Duration,
    }

    #[derive(Args, Debug)]
    struct CallArgs {
        #[command(flatten)]
        conn: Connection,
        /// The identity's kind.
        kind: String,
        /// The identity.
        identity: String,
        /// Bytes handed to the actor (UTF-8).
        #[arg(long, default_value = "")]
        payload: String,
        /// How long to wait for the cluster's topology.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        wait: Duration,
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
        let backend = args.conn.backend()?;
        let advertise = match (&args.advertise, args.port) {
            (Some(a), _) => a.clone(),
            (None, Some(port)) => {
                KubernetesProviderConfig::pod_address(port).map_err(|e| anyhow!("--port: {e}"))?
            }
            (None, None) => bail!("give --advertise host:port (or --port with POD_IP set)"),
        };
        let kinds: Vec<String> = args.kinds.into_iter().filter(|k| !k.is_empty()).collect();
        let mut ctx = ClusterProviderContext::new(
            &args.conn.cluster,
            &advertise,
            kinds,
            TokioClock::shared(),
        )
        .context("invalid --cluster, --advertise or --kinds")?;
        if let Some(z) = args.zone {
            ctx = ctx.with_zone(z);
        }
        let listen: SocketAddr = match args.listen {
            Some(l) => l,
            None => advertise
                .parse()
                .context("--advertise is not an ip:port to listen on; give --listen")?,
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen: cannot bind {listen}"))?;
        // With --actors: host, client and service wired by ActivationNode, whose event driver
        // starts here, before the provider; the service is served below, before the join.
        let activation = if args.actors {
            Some(
                ctx.member
                    .kinds
                    .iter()
                    .fold(ActivationNode::builder(ctx.clone()), |b, kind| {
                        b.kind(kind.clone(), Counter::kind(kind.clone()))
                    })
                    .call_timeout(args.conn.timeout)
                    .config(ActivationConfig {
                        drain: args.drain,
                        ..ActivationConfig::default()
                    })
                    .build()
                    .context("--actors")?,
            )
        } else {
            None
        };
        let partition = match &activation {
            Some(node) => node.service(),
            None => PartitionService::new(ctx.partition_manager.clone()).server(),
        };
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

        let (provider, at): (Box<dyn ClusterProvider>, String) = match backend {
            Backend::Registry(url) => (
                Box::new(RegistryProvider::new(args.conn.provider_config()?)),
                format!("registry {url}"),
            ),
            Backend::Kubernetes => (
                Box::new(args.conn.kubernetes_provider().await?),
                "the Kubernetes API".to_string(),
            ),
            Backend::Etcd(endpoints) => (
                Box::new(args.conn.etcd_provider(endpoints).await?),
                format!("etcd {}", endpoints.join(",")),
            ),
        };
        match &activation {
            Some(node) => node.start_member(provider.as_ref()).await,
            None => provider.start_member(ctx.clone()).await,
        }
        .with_context(|| format!("cannot join cluster {:?} at {at}", args.conn.cluster))?;
        tracing::info!(member = %ctx.member.id, "joined; press Ctrl-C or send SIGTERM to leave");
        shoal::runtime::shutdown_signal().await;
        match &activation {
            // Nothing active once peers see this member leave.
            Some(node) => node.shutdown(provider.as_ref(), true).await,
            None => provider.shutdown(true).await,
        }
        .context("leaving")?;
        printer.abort();
        Ok(())
    }

    async fn topology(args: TopologyArgs) -> Result<()> {
        let topology = fetch_topology(&args.conn, args.wait).await?;
        print_topology(&topology, args.json);
        Ok(())
    }

    /// The cluster's topology now, through whichever backend `conn` names.
    async fn fetch_topology(
        conn: &Connection,
        wait: Duration,
    ) -> Result<std::sync::Arc<ClusterTopology>> {
        Ok(match conn.backend()? {
            Backend::Registry(url) => registry_topology(conn, wait, url).await?,
            Backend::Kubernetes => {
                let mut config = conn.kubernetes_config()?;
                config.startup_timeout = wait;
                let api = KubeRsApi::from_environment()
                    .await
                    .map_err(|e| anyhow!("--kubernetes: {e}"))?;
                let provider = KubernetesProvider::new(config, std::sync::Arc::new(api));
                watched_topology(conn, wait, &provider, "the Kubernetes API").await?
            }
            Backend::Etcd(endpoints) => {
                let mut provider = conn.etcd_provider(endpoints).await?;
                provider.set_startup_timeout(wait);
                watched_topology(conn, wait, &provider, "etcd").await?
            }
        })
    }

    async fn call(args: CallArgs) -> Result<()> {
        if args.kind.is_empty() || args.identity.is_empty() {
            bail!("KIND and IDENTITY must not be empty");
        }
        let topology = fetch_topology(&args.conn, args.wait).await?;
        let ctx = ClusterProviderContext::new(
            &args.conn.cluster,
            "0.0.0.0:1", // a client: never published
            Vec::<String>::new(),
            TokioClock::shared(),
        )
        .context("invalid --cluster")?;
        ctx.apply_topology(topology)
            .map_err(|e| anyhow!("the topology does not apply: {e}"))?;
        let client = ActivationNode::builder(ctx)
            .call_timeout(args.conn.timeout)
            .build()
            .context("activation client")?;
        let called = client
            .call(&args.kind, &args.identity, args.payload.into_bytes())
            .await;
        let reply = called.result.map_err(|e| {
            let to = called
                .attempts
                .last()
                .map(|a| a.to.address.clone())
                .unwrap_or_default();
            anyhow!("{}/{} at {to}: {e}", args.kind, args.identity)
        })?;
        let address = called.attempts.last().map(|a| a.to.address.clone());
        println!(
            "{}",
            json!({"served_by": reply.served_by, "address": address,
                   "activated": reply.activated, "attempts": called.attempts.len(),
                   "version": reply.held.version,
                   "payload": String::from_utf8_lossy(&reply.payload)})
        );
        Ok(())
    }

    /// The built-in actor of `shoal member --actors`, registered for every kind the member
    /// advertises: each identity counts its calls; the count is handed to the next owner.
    /// Activations and deactivations are printed as JSON.
    struct Counter {
        kind: String,
        identity: String,
        calls: u64,
    }

    impl Counter {
        /// The factory of `kind`'s counters.
        fn kind(kind: String) -> impl ActorKind {
            move |identity: String, handed: Option<Vec<u8>>| {
                let calls = handed
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_le_bytes);
                println!(
                    "{}",
                    json!({"event": "activated", "kind": kind, "identity": identity, "calls": calls})
                );
                std::future::ready(Ok(Box::new(Counter {
                    kind: kind.clone(),
                    identity,
                    calls,
                }) as Box<dyn Actor>))
            }
        }
    }

    #[async_trait::async_trait]
    impl Actor for Counter {
        async fn call(&mut self, payload: Vec<u8>) -> Vec<u8> {
            self.calls += 1;
            json!({"identity": self.identity, "calls": self.calls,
                   "payload": String::from_utf8_lossy(&payload)})
            .to_string()
            .into_bytes()
        }

        async fn deactivate(self: Box<Self>, why: Deactivation) -> Option<Vec<u8>> {
            println!(
                "{}",
                json!({"event": "deactivated", "kind": self.kind, "identity": self.identity,
                       "reason": format!("{why:?}")})
            );
            Some(self.calls.to_le_bytes().to_vec())
        }
    }

    /// The cluster's members as `provider` lists them now: a client-mode provider's first
    /// view, written nowhere.
    async fn watched_topology(
        conn: &Connection,
        wait: Duration,
        provider: &dyn ClusterProvider,
        through: &str,
    ) -> Result<std::sync::Arc<ClusterTopology>> {
        let ctx = ClusterProviderContext::new(
            &conn.cluster,
            "0.0.0.0:1", // a client: never published
            Vec::<String>::new(),
            TokioClock::shared(),
        )
        .context("invalid --cluster")?;
        tokio::time::timeout(wait, provider.start_client(ctx.clone()))
            .await
            .map_err(|_| anyhow!("no topology through {through} within {wait:?}"))?
            .with_context(|| format!("cannot list cluster {:?} through {through}", conn.cluster))?;
        let topology = ctx.partition_manager.topology();
        provider
            .shutdown(true)
            .await
            .context("closing the watches")?;
        Ok(topology)
    }

    async fn registry_topology(
        conn: &Connection,
        wait: Duration,
        url: &str,
    ) -> Result<std::sync::Arc<ClusterTopology>> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("--registry: {url:?} is not a URL"))?
            .connect_timeout(conn.timeout);
        if let Some(tls) = conn.tls()? {
            endpoint = endpoint.tls_config(tls).context("invalid TLS settings")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach the registry at {url}"))?;
        let mut client = pb::registry_client::RegistryClient::new(channel)
            .max_decoding_message_size(shoal::registry::MAX_DECODE_BYTES);
        let req = pb::WatchRequest {
            cluster: conn.cluster.clone(),
            from_version: 0,
            cluster_token: conn.token()?.unwrap_or_default(),
            epoch: 0,
            fragments: false,
            accept_encodings: Vec::new(),
        };
        let topology = tokio::time::timeout(wait, async {
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
        .with_context(|| format!("no topology from {url} within {wait:?}"))?
        .map_err(|s| anyhow::anyhow!("registry refused: {:?}: {}", s.code(), s.message()))?;
        Ok(topology)
    }

    fn print_topology(topology: &ClusterTopology, json: bool) {
        if json {
            println!("{}", snapshot_json(topology));
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
            Command::Call(a) => {
                if a.conn.cluster.is_empty() {
                    bail!("--cluster must not be empty");
                }
                call(a).await
            }
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
