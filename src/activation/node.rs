//! [`ActivationNode`]: a node's activation pieces (host, client, transport, partition service)
//! built in one place, and started and stopped in the order the protocol needs.
//!
//! Built by hand, the pieces take five-argument constructors and two ordering rules that are
//! easy to break (the repository's own simulator broke both until 2026-12-08):
//! * the host follows the node's membership events from before the provider starts, and the
//!   partition service answers at the member's address before the member is listed: a peer
//!   that lists a member whose service does not answer yet fails every release round it
//!   starts (at 1,000 simulated members that was 26 rounds per activation instead of one);
//! * the host shuts down (everything deactivated) before the provider leaves, so nothing is
//!   active once peers see the member gone.
//!
//! [`ActivationNode::builder`] takes the context, the actors (kinds with their own factories,
//! or one [`Actors`] object) and optional settings; the node starts the host's event driver
//! when it is built, hands out the service to serve, and runs [`ActivationNode::start_member`]
//! and [`ActivationNode::shutdown`] in the right order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::client::{ActivationClient, Called, ClientConfig};
use super::grpc::GrpcTransport;
use super::host::{ActivationConfig, ActivationHost, Actors, Transport};
use super::kinds::{ActorKind, Kinds};
use super::lookup::{IdentityLookup, PlacementLookup};
use crate::cluster::MemberId;
use crate::provider::remote::{PartitionGrpcService, PartitionService};
use crate::provider::{ClusterProvider, ClusterProviderContext, ProviderError};
use crate::runtime::TaskHandle;

/// Why an [`ActivationBuilder`] refused to build: the actors given do not match the kinds the
/// member advertises, so peers would route calls here that nothing can serve, or never route
/// the ones something could.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// One kind registered twice.
    #[error("actor kind {0:?} is registered twice")]
    DuplicateKind(String),
    /// Both registered kinds and an [`Actors`] object were given.
    #[error("give either registered kinds or one Actors object, not both")]
    ActorsAndKinds,
    /// The member advertises kinds and no actors were given for them.
    #[error("the member advertises kinds {0:?} but no actors were given")]
    NoActors(Vec<String>),
    /// A kind has a factory, but the member does not advertise it: no call would reach it.
    #[error(
        "actor kind {kind:?} is registered but the member does not advertise it (advertised: {advertised:?})"
    )]
    NotAdvertised {
        /// The registered kind.
        kind: String,
        /// What the member advertises.
        advertised: Vec<String>,
    },
    /// The member advertises a kind no factory is registered for: its calls would all fail.
    #[error("the member advertises actor kind {0:?} but no factory is registered for it")]
    NoFactory(String),
    /// A client (it advertises no kind) was given actors or kinds: a client hosts nothing.
    #[error("a client node (no kinds advertised) hosts no actors")]
    ClientWithActors,
}

/// Builds an [`ActivationNode`]; see [`ActivationNode::builder`].
pub struct ActivationBuilder {
    ctx: ClusterProviderContext,
    kinds: BTreeMap<String, Arc<dyn ActorKind>>,
    duplicate: Option<String>,
    actors: Option<Arc<dyn Actors>>,
    transport: Option<Arc<dyn Transport>>,
    lookup: Option<Arc<dyn IdentityLookup>>,
    config: ActivationConfig,
    client: ClientConfig,
    call_timeout: Duration,
}

impl ActivationBuilder {
    /// The default per-call deadline of the built-in transport: longer than most actor calls;
    /// a transport that gives up on calls still running only piles retries onto the queue.
    pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

    /// Registers `kind`, whose activations `factory` makes (each a value holding its state;
    /// see [`super::Actor`]).
    pub fn kind(mut self, kind: impl Into<String>, factory: impl ActorKind) -> Self {
        let kind = kind.into();
        match self.kinds.entry(kind) {
            std::collections::btree_map::Entry::Occupied(taken) => {
                self.duplicate.get_or_insert_with(|| taken.key().clone());
            }
            std::collections::btree_map::Entry::Vacant(free) => {
                free.insert(Arc::new(factory));
            }
        }
        self
    }

    /// Uses one [`Actors`] object for every kind the member advertises (an actor framework's
    /// own dispatch), instead of registered kinds.
    pub fn actors(mut self, actors: Arc<dyn Actors>) -> Self {
        self.actors = Some(actors);
        self
    }

    /// Carries calls, releases and settles with `transport` (default: [`GrpcTransport`] with
    /// [`Self::call_timeout`]); host and client share it.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The built-in transport's deadline for one call (default [`Self::CALL_TIMEOUT`]).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Finds owners with `lookup` (default: [`PlacementLookup`] over the node's own topology).
    pub fn lookup(mut self, lookup: Arc<dyn IdentityLookup>) -> Self {
        self.lookup = Some(lookup);
        self
    }

    /// The host's settings.
    pub fn config(mut self, config: ActivationConfig) -> Self {
        self.config = config;
        self
    }

    /// The client's retry settings.
    pub fn client_config(mut self, config: ClientConfig) -> Self {
        self.client = config;
        self
    }

    /// Checks the actors against the kinds the member advertises, builds the pieces and starts
    /// the host's event driver (so it sees every membership event of the provider to come).
    /// Call it inside the runtime the node runs on.
    pub fn build(self) -> Result<ActivationNode, BuildError> {
        if let Some(kind) = self.duplicate {
            return Err(BuildError::DuplicateKind(kind));
        }
        let advertised: Vec<String> = self.ctx.member.kinds.iter().cloned().collect();
        if advertised.is_empty() && (self.actors.is_some() || !self.kinds.is_empty()) {
            return Err(BuildError::ClientWithActors);
        }
        let actors: Option<Arc<dyn Actors>> = match (self.actors, self.kinds.is_empty()) {
            (Some(_), false) => return Err(BuildError::ActorsAndKinds),
            (Some(actors), true) => Some(actors),
            (None, false) => {
                if let Some(kind) = self.kinds.keys().find(|k| !advertised.contains(k)) {
                    return Err(BuildError::NotAdvertised {
                        kind: kind.clone(),
                        advertised,
                    });
                }
                if let Some(kind) = advertised.iter().find(|k| !self.kinds.contains_key(*k)) {
                    return Err(BuildError::NoFactory(kind.clone()));
                }
                Some(Arc::new(Kinds::new(self.kinds)))
            }
            (None, true) => None,
        };
        match (&actors, advertised.is_empty()) {
            (Some(_), true) => return Err(BuildError::ClientWithActors),
            (None, false) => return Err(BuildError::NoActors(advertised)),
            _ => {}
        }
        let ctx = self.ctx;
        let transport = self.transport.unwrap_or_else(|| {
            Arc::new(GrpcTransport::new(
                ctx.cluster_name.clone(),
                ctx.clock.clone(),
                self.call_timeout,
            ))
        });
        let host = actors
            .map(|actors| ActivationHost::new(ctx.clone(), actors, transport.clone(), self.config));
        let driver = host.as_ref().map(|h| h.start());
        let lookup = self
            .lookup
            .unwrap_or_else(|| Arc::new(PlacementLookup::new(ctx.partition_manager.clone())));
        let client = Arc::new(ActivationClient::new(
            ctx.clone(),
            lookup,
            host.clone(),
            transport,
            self.client,
        ));
        Ok(ActivationNode {
            ctx,
            host,
            client,
            driver,
        })
    }
}

/// A node's activation pieces, wired: the host (on a member), the client every node calls
/// identities with, and the partition service peers reach the host through.
///
/// Order of use: build it before the provider starts; serve [`Self::service`] at the member's
/// advertised address; then [`Self::start_member`]; on the way out [`Self::shutdown`].
pub struct ActivationNode {
    ctx: ClusterProviderContext,
    host: Option<Arc<ActivationHost>>,
    client: Arc<ActivationClient>,
    /// The host's event driver: it ends with the node (dropped or shut down), not with the
    /// event stream, which the host's own context keeps open.
    driver: Option<TaskHandle>,
}

impl Drop for ActivationNode {
    fn drop(&mut self) {
        if let Some(driver) = &self.driver {
            driver.abort();
        }
    }
}

impl std::fmt::Debug for ActivationNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationNode")
            .field("member", &self.ctx.member.id)
            .field("hosts", &self.host.is_some())
            .finish()
    }
}

impl ActivationNode {
    /// Starts building the activation pieces of the node of `ctx`. A member (it advertises
    /// kinds) needs actors for exactly those kinds: [`ActivationBuilder::kind`] per kind, or
    /// one [`ActivationBuilder::actors`]; a client (no kinds) gets only a client.
    pub fn builder(ctx: ClusterProviderContext) -> ActivationBuilder {
        ActivationBuilder {
            ctx,
            kinds: BTreeMap::new(),
            duplicate: None,
            actors: None,
            transport: None,
            lookup: None,
            config: ActivationConfig::default(),
            client: ClientConfig::default(),
            call_timeout: ActivationBuilder::CALL_TIMEOUT,
        }
    }

    /// The host, on a member.
    pub fn host(&self) -> Option<&Arc<ActivationHost>> {
        self.host.as_ref()
    }

    /// The client: calls any identity from this node (locally when this member owns it).
    pub fn client(&self) -> &Arc<ActivationClient> {
        &self.client
    }

    /// Calls `kind/identity` with `payload` (see [`ActivationClient::call`]).
    pub async fn call(&self, kind: &str, identity: &str, payload: Vec<u8>) -> Called {
        self.client.call(kind, identity, payload).await
    }

    /// The partition service (owner lookups; calls, releases and settles for the host): serve
    /// it at the member's advertised address before [`Self::start_member`], so no peer lists
    /// this member while its service does not answer.
    pub fn service(&self) -> PartitionGrpcService {
        let mut service = PartitionService::new(self.ctx.partition_manager.clone());
        if let Some(host) = &self.host {
            service = service.with_host(host.clone());
        }
        service.server()
    }

    /// Joins the cluster through `provider` as the member of this node's context (the host
    /// already follows its events; serve [`Self::service`] first).
    pub async fn start_member(&self, provider: &dyn ClusterProvider) -> Result<(), ProviderError> {
        provider.start_member(self.ctx.clone()).await
    }

    /// Joins through `provider` as incarnation `id` of this node's member: after a start that
    /// failed, the next attempt is a new incarnation (`MemberId::successor`), and the host
    /// serves as it from now on.
    pub async fn start_member_as(
        &self,
        provider: &dyn ClusterProvider,
        id: MemberId,
    ) -> Result<(), ProviderError> {
        if let Some(host) = &self.host {
            host.begin_as(id.clone());
        }
        provider
            .start_member(self.ctx.clone().with_member_id(id))
            .await
    }

    /// Watches the cluster through `provider` as a client.
    pub async fn start_client(&self, provider: &dyn ClusterProvider) -> Result<(), ProviderError> {
        provider.start_client(self.ctx.clone()).await
    }

    /// Deactivates everything (once every `deactivate` returned), then shuts the provider
    /// down (`graceful`: leaves the cluster), so nothing is active here once peers see this
    /// member gone.
    pub async fn shutdown(
        &self,
        provider: &dyn ClusterProvider,
        graceful: bool,
    ) -> Result<(), ProviderError> {
        if let Some(host) = &self.host {
            host.shutdown().await;
        }
        if let Some(driver) = &self.driver {
            driver.abort();
        }
        provider.shutdown(graceful).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::{Actor, ActorError, Deactivation};
    use crate::runtime::TokioClock;
    use async_trait::async_trait;

    struct Echo;

    #[async_trait]
    impl Actor for Echo {
        async fn call(&mut self, payload: Vec<u8>) -> Vec<u8> {
            payload
        }
        async fn deactivate(self: Box<Self>, _reason: Deactivation) -> Option<Vec<u8>> {
            None
        }
    }

    async fn echo(_id: String, _handed: Option<Vec<u8>>) -> Result<Box<dyn Actor>, ActorError> {
        Ok(Box::new(Echo))
    }

    fn ctx(kinds: &[&str]) -> ClusterProviderContext {
        ClusterProviderContext::new(
            "c",
            "127.0.0.1:1",
            kinds.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            TokioClock::shared(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn actors_must_match_the_kinds_the_member_advertises() {
        let err = |b: ActivationBuilder| b.build().unwrap_err();
        assert_eq!(
            err(ActivationNode::builder(ctx(&["a"]))
                .kind("a", echo)
                .kind("a", echo)),
            BuildError::DuplicateKind("a".into())
        );
        assert_eq!(
            err(ActivationNode::builder(ctx(&["a"]))
                .kind("a", echo)
                .kind("b", echo)),
            BuildError::NotAdvertised {
                kind: "b".into(),
                advertised: vec!["a".into()]
            }
        );
        assert_eq!(
            err(ActivationNode::builder(ctx(&["a", "b"])).kind("a", echo)),
            BuildError::NoFactory("b".into())
        );
        assert_eq!(
            err(ActivationNode::builder(ctx(&["a"]))),
            BuildError::NoActors(vec!["a".into()])
        );
        assert_eq!(
            err(ActivationNode::builder(ctx(&[])).kind("a", echo)),
            BuildError::ClientWithActors
        );
        let kinds = Arc::new(Kinds::new(BTreeMap::new()));
        assert_eq!(
            err(ActivationNode::builder(ctx(&[])).actors(kinds.clone())),
            BuildError::ClientWithActors
        );
        assert_eq!(
            err(ActivationNode::builder(ctx(&["a"]))
                .actors(kinds)
                .kind("a", echo)),
            BuildError::ActorsAndKinds
        );
        let member = ActivationNode::builder(ctx(&["a", "b"]))
            .kind("b", echo)
            .kind("a", echo)
            .build()
            .unwrap();
        assert!(member.host().is_some());
        let client = ActivationNode::builder(ctx(&[])).build().unwrap();
        assert!(client.host().is_none());
    }

    #[tokio::test]
    async fn a_start_retried_as_a_new_incarnation_is_served_as_it() {
        let c = ctx(&["a"]);
        let node = ActivationNode::builder(c.clone())
            .kind("a", echo)
            .build()
            .unwrap();
        let host = node.host().unwrap();
        assert_eq!(host.member_id(), c.member.id);
        let next = c.member.id.successor(c.clock.as_ref());
        assert_ne!(next, c.member.id);
        // The in-memory provider: a start, then one as the next incarnation (its first start
        // is refused as already started, which is all the retry needs here).
        let provider = crate::provider::memory::InMemoryProvider::new(
            crate::provider::memory::InMemoryRegistry::new(),
        );
        node.start_member(&provider).await.unwrap();
        let _ = node.start_member_as(&provider, next.clone()).await;
        assert_eq!(host.member_id(), next);
    }
}
