//! Reaching another member's partition manager.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use super::ProviderError;
use crate::cluster::{Member, MemberId};
use crate::placement::PartitionManager;

/// What one member's partition manager answers to other members: who it thinks owns an
/// identity, and at which topology version. Comparing the two lets a caller detect that it and
/// the remote member disagree because one of them is behind.
#[async_trait]
pub trait PartitionManagerClient: Send + Sync + fmt::Debug {
    /// The member whose partition manager this reaches.
    fn member_id(&self) -> &MemberId;
    /// The owner of `identity` of `kind` in that member's view.
    async fn owner(&self, kind: &str, identity: &str) -> Result<Option<Member>, ProviderError>;
    /// The topology version that member holds.
    async fn topology_version(&self) -> Result<u64, ProviderError>;
}

/// A shareable handle returned by [`super::ClusterProvider::resolve_partition_manager`].
pub type PartitionManagerHandle = Arc<dyn PartitionManagerClient>;

/// A partition manager in this process.
#[derive(Debug, Clone)]
pub struct LocalPartitionManager {
    member: MemberId,
    manager: Arc<PartitionManager>,
}

impl LocalPartitionManager {
    /// Wraps `manager`, which belongs to `member`.
    pub fn new(member: MemberId, manager: Arc<PartitionManager>) -> Self {
        Self { member, manager }
    }
}

#[async_trait]
impl PartitionManagerClient for LocalPartitionManager {
    fn member_id(&self) -> &MemberId {
        &self.member
    }

    async fn owner(&self, kind: &str, identity: &str) -> Result<Option<Member>, ProviderError> {
        Ok(self
            .manager
            .peek_owner(kind, identity)
            .map(|m| (*m).clone()))
    }

    async fn topology_version(&self) -> Result<u64, ProviderError> {
        Ok(self.manager.version())
    }
}

/// Generated protocol types and gRPC stubs of the partition service (`shoal.partition.v1`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("shoal.partition.v1");
}

/// Serves this node's partition manager to other members (`shoal.partition.v1.PartitionService`).
/// Add [`PartitionService::server`] to the node's gRPC server at its advertised address.
#[derive(Debug, Clone)]
pub struct PartitionService {
    manager: Arc<PartitionManager>,
    host: Option<Arc<crate::activation::ActivationHost>>,
}

impl PartitionService {
    /// Serves `manager` (no actors: `Call` and `Release` answer `UNIMPLEMENTED`).
    pub fn new(manager: Arc<PartitionManager>) -> Self {
        Self {
            manager,
            host: None,
        }
    }

    /// Serves calls to this node's actors through `host` too.
    pub fn with_host(mut self, host: Arc<crate::activation::ActivationHost>) -> Self {
        self.host = Some(host);
        self
    }

    /// The gRPC service to add to a server.
    pub fn server(self) -> PartitionGrpcService {
        pb::partition_service_server::PartitionServiceServer::new(self)
            .max_decoding_message_size(crate::activation::MAX_PAYLOAD + 16 * 1024)
    }

    fn check(&self, cluster: &str, kind: &str, identity: &str) -> Result<(), tonic::Status> {
        if cluster != self.manager.cluster_name() {
            return Err(tonic::Status::not_found(format!(
                "this member serves cluster {:?}, not {:?}",
                self.manager.cluster_name(),
                cluster
            )));
        }
        if kind.is_empty() || identity.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "kind and identity are required",
            ));
        }
        if kind.len() > crate::activation::MAX_NAME || identity.len() > crate::activation::MAX_NAME
        {
            return Err(tonic::Status::invalid_argument(format!(
                "kind and identity are at most {} bytes",
                crate::activation::MAX_NAME
            )));
        }
        Ok(())
    }

    fn host(&self) -> Result<&Arc<crate::activation::ActivationHost>, tonic::Status> {
        self.host
            .as_ref()
            .ok_or_else(|| tonic::Status::unimplemented("this member hosts no actors"))
    }
}

/// The partition service as a gRPC service to add to a tonic server.
#[cfg(not(madsim))]
pub type PartitionGrpcService =
    pb::partition_service_server::PartitionServiceServer<PartitionService>;
/// The partition service as a gRPC service to add to a tonic server.
#[cfg(madsim)]
pub type PartitionGrpcService = pb::partition_service_server::PartitionServiceServer<
    PartitionService,
    tonic::codegen::IdentityInterceptor,
>;

#[tonic::async_trait]
impl pb::partition_service_server::PartitionService for PartitionService {
    async fn owner(
        &self,
        request: tonic::Request<pb::OwnerRequest>,
    ) -> Result<tonic::Response<pb::OwnerResponse>, tonic::Status> {
        let req = request.into_inner();
        self.check(&req.cluster, &req.kind, &req.identity)?;
        let version = self.manager.version();
        let owner = self.manager.peek_owner(&req.kind, &req.identity);
        Ok(tonic::Response::new(pb::OwnerResponse {
            owner_id: owner.as_ref().map(|m| m.id.to_string()).unwrap_or_default(),
            owner_address: owner.map(|m| m.address.clone()).unwrap_or_default(),
            topology_version: version,
        }))
    }

    async fn call(
        &self,
        request: tonic::Request<pb::CallRequest>,
    ) -> Result<tonic::Response<pb::CallResponse>, tonic::Status> {
        let req = request.into_inner();
        self.check(&req.cluster, &req.kind, &req.identity)?;
        let host = self.host()?;
        if req.payload.len() > crate::activation::MAX_PAYLOAD {
            return Err(tonic::Status::invalid_argument(format!(
                "payload is {} bytes, at most {} are allowed",
                req.payload.len(),
                crate::activation::MAX_PAYLOAD
            )));
        }
        let fence = crate::activation::grpc::fence_from(req.fence.as_ref(), "fence")?;
        let reply = host
            .call(&req.kind, &req.identity, &fence, req.payload)
            .await
            .map_err(crate::activation::grpc::status_of)?;
        Ok(tonic::Response::new(pb::CallResponse {
            served_by: reply.served_by.to_string(),
            held: Some(crate::activation::grpc::fence_to(&reply.held)),
            activated: reply.activated,
            payload: reply.payload,
            generation: reply.generation,
        }))
    }

    async fn release(
        &self,
        request: tonic::Request<pb::ReleaseRequest>,
    ) -> Result<tonic::Response<pb::ReleaseResponse>, tonic::Status> {
        let req = request.into_inner();
        self.check(&req.cluster, &req.kind, &req.identity)?;
        let host = self.host()?;
        let claim = crate::activation::grpc::fence_from(req.claim.as_ref(), "claim")?;
        if req.claimant_address.len() > crate::activation::MAX_NAME {
            return Err(tonic::Status::invalid_argument(format!(
                "claimant_address is at most {} bytes",
                crate::activation::MAX_NAME
            )));
        }
        let released = host
            .release(&req.kind, &req.identity, &claim, &req.claimant_address)
            .await
            .map_err(crate::activation::grpc::status_of)?;
        Ok(tonic::Response::new(pb::ReleaseResponse {
            was_active: released.was_active,
            has_handed_state: released.handed.is_some(),
            handed_state: released.handed.unwrap_or_default(),
            generation: released.generation,
            settled_by: released
                .settled
                .as_ref()
                .map(|(by, _)| by.to_string())
                .unwrap_or_default(),
            settled_generation: released.settled.as_ref().map_or(0, |(_, g)| *g),
            held_epoch: released.under.0,
            held_version: released.under.1,
            lost_with_membership: released.lost,
            answered_as: released
                .answered_as
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }))
    }

    async fn settle(
        &self,
        request: tonic::Request<pb::SettleRequest>,
    ) -> Result<tonic::Response<pb::SettleResponse>, tonic::Status> {
        let req = request.into_inner();
        self.check(&req.cluster, &req.kind, &req.identity)?;
        let host = self.host()?;
        let claimant = MemberId::parse(&req.claimant).map_err(|e| {
            tonic::Status::invalid_argument(format!("claimant {:?}: {e}", req.claimant))
        })?;
        Ok(tonic::Response::new(pb::SettleResponse {
            settled: host.settle(&req.kind, &req.identity, req.generation, &claimant),
        }))
    }
}

/// A partition manager in another process, reached over gRPC at the member's address.
#[derive(Debug, Clone)]
pub struct GrpcPartitionManager {
    cluster: String,
    member: Member,
    client: pb::partition_service_client::PartitionServiceClient<tonic::transport::Channel>,
    rpc_timeout: std::time::Duration,
    clock: crate::runtime::SharedClock,
}

impl GrpcPartitionManager {
    /// A client for the partition service of `member` as `ctx`'s own topology lists it (the
    /// providers whose nodes hold every member's address: Kubernetes, etcd).
    pub fn of_listed(
        ctx: &super::ClusterProviderContext,
        member: &MemberId,
        rpc_timeout: std::time::Duration,
    ) -> Result<PartitionManagerHandle, ProviderError> {
        let found = ctx
            .partition_manager
            .topology()
            .member(member)
            .cloned()
            .ok_or_else(|| ProviderError::UnknownMember(member.clone()))?;
        Ok(Arc::new(Self::new(
            ctx.cluster_name.clone(),
            found,
            rpc_timeout,
            ctx.clock.clone(),
        )?))
    }

    /// A client for `member`'s partition service (connected lazily, at its address over
    /// plaintext HTTP/2).
    pub fn new(
        cluster: String,
        member: Member,
        rpc_timeout: std::time::Duration,
        clock: crate::runtime::SharedClock,
    ) -> Result<Self, ProviderError> {
        let url = format!("http://{}", member.address);
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| {
                ProviderError::Rejected(format!(
                    "member address {url:?} is not a valid endpoint: {e}"
                ))
            })?
            .connect_timeout(rpc_timeout)
            .connect_lazy();
        Ok(Self {
            cluster,
            member,
            client: pb::partition_service_client::PartitionServiceClient::new(channel),
            rpc_timeout,
            clock,
        })
    }

    async fn ask(&self, kind: &str, identity: &str) -> Result<pb::OwnerResponse, ProviderError> {
        let mut client = self.client.clone();
        let req = pb::OwnerRequest {
            cluster: self.cluster.clone(),
            kind: kind.to_string(),
            identity: identity.to_string(),
        };
        match crate::runtime::timeout(self.clock.as_ref(), self.rpc_timeout, client.owner(req))
            .await
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(ProviderError::Unavailable(format!(
                "partition service of {}: {:?} {}",
                self.member.id,
                s.code(),
                s.message()
            ))),
            Err(_) => Err(ProviderError::Unavailable(format!(
                "partition service of {} did not answer within {:?}",
                self.member.id, self.rpc_timeout
            ))),
        }
    }
}

#[async_trait]
impl PartitionManagerClient for GrpcPartitionManager {
    fn member_id(&self) -> &MemberId {
        &self.member.id
    }

    async fn owner(&self, kind: &str, identity: &str) -> Result<Option<Member>, ProviderError> {
        let r = self.ask(kind, identity).await?;
        if r.owner_id.is_empty() {
            return Ok(None);
        }
        let id = MemberId::parse(&r.owner_id)?;
        // The answer names the owner; its full description is the caller's own topology's.
        Ok(Some(Member::new(id, r.owner_address, [kind])))
    }

    async fn topology_version(&self) -> Result<u64, ProviderError> {
        // Any well-formed question returns the version; the answer itself is not needed.
        Ok(self.ask("_", "_").await?.topology_version)
    }
}
