//! One simulated node's process: it starts its provider (retrying a failed start as a new
//! incarnation), publishes its incarnation for the checkers, follows its events for the
//! oracles, hosts the activation workload's actors, runs the workloads and your app, and
//! shuts down gracefully when the harness asks.

use super::*;

/// Everything a node's init task needs (cloned on every (re)start).
#[derive(Clone)]
pub(crate) struct NodeSpec {
    pub(crate) name: String,
    pub(crate) ip: IpAddr,
    pub(crate) is_client: bool,
    /// The control plane it reaches through its provider (weak: madsim keeps this spec in its
    /// node table for restarts, and a strong reference would close a cycle through the
    /// control plane's runtime handle that outlives the run).
    pub(crate) control: std::sync::Weak<dyn ControlPlane>,
    pub(crate) flaw: Flaw,
    pub(crate) clock: Arc<SkewedClock>,
    pub(crate) current: Arc<Mutex<Option<Incarnation>>>,
    pub(crate) recorder: Recorder,
    pub(crate) oracles: Arc<Oracles>,
    pub(crate) knobs: Knobs,
    pub(crate) stop: Arc<StopSignal>,
    pub(crate) describe: Arc<DescribeSignal>,
    pub(crate) metrics: Arc<Mutex<Vec<MetricSource>>>,
    pub(crate) fresh: Arc<FreshOwners>,
    pub(crate) app: Option<AppFn>,
    pub(crate) activation: Arc<ActivationOracle>,
    pub(crate) failover: Arc<FailoverMeter>,
    /// The node's slot.
    pub(crate) index: usize,
}

impl NodeSpec {
    /// Applies each [`Fault::Describe`] addressed to this node through the provider.
    async fn describer(self, provider: Arc<dyn ClusterProvider>) {
        loop {
            self.describe.notify.notified().await;
            let Some(generation) = lock(&self.describe.generation).take() else {
                continue;
            };
            let d = description_of(generation);
            if let Some(inc) = lock(&self.current).as_mut() {
                inc.description = d.clone();
            }
            match provider.update_member(d).await {
                Ok(()) => self.recorder.trace(
                    &self.name,
                    format!("description generation {generation} shown"),
                ),
                Err(e) => {
                    self.recorder
                        .count("node: description update not shown in time");
                    self.recorder.trace(
                        &self.name,
                        format!("description generation {generation}: {e}"),
                    );
                }
            }
        }
    }

    pub(crate) async fn run(self) {
        // Processes start at different moments (0-2 s apart), so heartbeat phases differ.
        sleep(Duration::from_millis(madsim::rand::random::<u64>() % 2_000)).await;
        let clock: SharedClock = self.clock.clone();
        let kinds: Vec<&str> = if self.is_client { vec![] } else { vec![KIND] };
        let mut ctx =
            ClusterProviderContext::new(CLUSTER, format!("{}:4000", self.ip), kinds, clock)
                .expect("valid member")
                .with_events(EventStream::new(self.knobs.event_capacity))
                .with_partition_config(PartitionConfig {
                    max_cached_identities: self.knobs.cache_capacity,
                    rule: self.knobs.placement_rule(),
                });
        let id = ctx.member.id.clone();
        self.recorder
            .trace(&self.name, format!("incarnation {id} starting"));

        {
            let mut m = lock(&self.metrics);
            m.push(MetricSource::Events(ctx.events.metrics().clone()));
            m.push(MetricSource::Placement(
                ctx.partition_manager.metrics().clone(),
            ));
        }
        // Record every topology the node applies (subscribed before the provider starts).
        let mut events = ctx.events.subscribe();
        let workload_events = ctx.events.subscribe();
        // The view the workload's subscription starts from (its first report is from it).
        let workload_from = ctx.partition_manager.topology();
        let activation = self.activation.clone();
        let (rec, oracles, name, rid, pm, current) = (
            self.recorder.clone(),
            self.oracles.clone(),
            self.name.clone(),
            id.clone(),
            ctx.partition_manager.clone(),
            self.current.clone(),
        );
        let (failover, index) = (self.failover.clone(), self.index);
        let chain = EventChain::shared();
        let chained = chain.clone();
        let print = ViewPrint::shared();
        let printed = print.clone();
        let print_for_workload = print.clone();
        madsim::task::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ClusterEvent::TopologyChanged { topology, report }) => {
                        lock(&chained).changed(&name, &topology, &report, &rec);
                        let (fp, wrong) = lock(&printed).advance(&topology, Some(&report.diff));
                        if wrong {
                            rec.violation_once(
                                format!("diff {name} {}", topology.version()),
                                format!(
                                    "placement: {name}'s report of the change to v{} names a membership diff that does not turn the view it held into the one applied",
                                    topology.version()
                                ),
                            );
                        }
                        rec.observe(&name, &rid, &topology, fp);
                        oracles.applied(&name, &topology, fp);
                        failover.applied(index, &topology);
                    }
                    Ok(ClusterEvent::MembershipLost { member, reason, .. }) => {
                        rec.trace(&name, format!("membership lost as {member}: {reason}"));
                        oracles.lost(&member);
                        activation.membership_lost(&name);
                    }
                    Ok(ClusterEvent::MembershipRestored {
                        member, previous, ..
                    }) => {
                        rec.trace(
                            &name,
                            format!("membership restored as {} (was {previous})", member.id),
                        );
                        activation.restored(&name, &member.id, &previous);
                        if let Some(inc) = lock(&current).as_mut()
                            && inc.id != member.id
                        {
                            let old = std::mem::replace(&mut inc.id, member.id.clone());
                            inc.earlier_ids.push(old);
                        }
                    }
                    Ok(_) => {}
                    Err(shoal::SubscriptionError::Lagged { missed }) => {
                        lock(&chained).lagged();
                        rec.trace(&name, format!("event stream lagged by {missed}"));
                        // The view itself is still judged: the manager holds it.
                        let t = pm.topology();
                        if t.version() > 0 {
                            let (fp, _) = lock(&printed).advance(&t, None);
                            oracles.applied(&name, &t, fp);
                            failover.applied(index, &t);
                        }
                    }
                    Err(shoal::SubscriptionError::Closed) => break,
                }
            }
        });
        let Some(control) = self.control.upgrade() else {
            return; // The run is over.
        };
        let provider = control.provider(&NodeInfo {
            name: self.name.clone(),
            ip: self.ip,
            is_client: self.is_client,
        });
        let provider: Arc<dyn ClusterProvider> = if self.flaw.wraps_provider() {
            Arc::new(FlawedProvider::new(provider, self.flaw))
        } else {
            provider
        };
        *lock(&self.current) = Some(Incarnation {
            id: id.clone(),
            earlier_ids: Vec::new(),
            abandoned_ids: Vec::new(),
            manager: ctx.partition_manager.clone(),
            started_at: Instant::now(),
            ready_at: None,
            description: if self.is_client {
                Description::default()
            } else {
                base_description()
            },
            activation: None,
            events: chain,
            print,
        });
        // Actors: members host them (served by the real partition service over the simulated
        // network); every node calls them. Built, and the service served, before the provider
        // starts (ActivationNode's order: a peer that lists this member reaches its service).
        let actors = (!self.is_client).then(|| {
            SimActors::new(
                self.name.clone(),
                ctx.clone(),
                self.knobs.placement_rule(),
                self.activation.clone(),
                self.recorder.clone(),
            )
        });
        let mut builder = ActivationNode::builder(ctx.clone())
            .transport(crate::activation::transport(&ctx, &self.recorder))
            .config(crate::activation::config());
        if let Some(actors) = &actors {
            builder = builder.actors(actors.clone());
        }
        let activation = match builder.build() {
            Ok(node) => node,
            Err(e) => {
                self.recorder.violation_once(
                    format!("activation build {}", self.name),
                    format!(
                        "activation: {} could not build its activation node: {e}",
                        self.name
                    ),
                );
                return;
            }
        };
        let host = activation.host().cloned();
        if let (Some(actors), Some(host)) = (&actors, &host) {
            actors.attach(host);
            let service = activation.service();
            let addr = SocketAddr::new(self.ip, crate::activation::PORT);
            let rec = self.recorder.clone();
            let name = self.name.clone();
            madsim::task::spawn(async move {
                if let Err(e) = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve(addr)
                    .await
                {
                    rec.trace(&name, format!("partition service ended: {e}"));
                }
            });
        }
        let mut attempt = 0u32;
        loop {
            let started = if self.is_client {
                provider.start_client(ctx.clone()).await
            } else {
                // As the incarnation of this attempt (a retry is a new one): the host serves
                // as it too.
                activation
                    .start_member_as(provider.as_ref(), ctx.member.id.clone())
                    .await
            };
            match started {
                Ok(()) => break,
                Err(e) => {
                    attempt += 1;
                    self.recorder.count("node: start retried");
                    self.recorder
                        .trace(&self.name, format!("start failed (attempt {attempt}): {e}"));
                    // A failed start withdrew its registration: the next attempt is a new
                    // incarnation (peers may have seen this one come and go).
                    let next = ctx.member.id.successor(self.clock.as_ref());
                    if let Some(inc) = lock(&self.current).as_mut() {
                        let old = std::mem::replace(&mut inc.id, next.clone());
                        inc.abandoned_ids.push(old);
                    }
                    if !self.is_client {
                        self.oracles.abandoned(ctx.member.id.clone());
                    }
                    ctx = ctx.with_member_id(next);
                    sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let client = activation.client().clone();
        if let Some(inc) = lock(&self.current).as_mut() {
            inc.ready_at = Some(Instant::now());
            inc.activation = Some(client.clone());
        }
        madsim::task::spawn(crate::activation::workload(client, self.recorder.clone()));
        self.recorder.trace(&self.name, "provider started");
        if !self.is_client {
            madsim::task::spawn(self.clone().describer(provider.clone()));
        }
        madsim::task::spawn(
            Workload::new(
                self.name.clone(),
                ctx.clone(),
                self.recorder.clone(),
                (workload_events, workload_from),
                self.knobs.cache_capacity,
                self.fresh.clone(),
                print_for_workload,
            )
            .run(),
        );
        let app = async {
            if let Some(app) = self.app {
                app(NodeApp {
                    name: self.name.clone(),
                    is_client: self.is_client,
                    ctx: ctx.clone(),
                    recorder: self.recorder.clone(),
                })
                .await;
            }
            std::future::pending::<()>().await;
        };
        let stop = async {
            loop {
                self.stop.notify.notified().await;
                if self.stop.requested.load(Ordering::SeqCst) {
                    return;
                }
            }
        };
        tokio::select! {
            biased;
            _ = stop => {}
            _ = app => {}
        }
        // Everything deactivated before the provider leaves.
        match activation.shutdown(provider.as_ref(), true).await {
            Ok(()) => self
                .recorder
                .trace(&self.name, "provider shut down gracefully"),
            Err(e) => self
                .recorder
                .trace(&self.name, format!("graceful shutdown failed: {e}")),
        }
        *lock(&self.stop.done) = Some(Instant::now());
        std::future::pending::<()>().await;
    }
}
