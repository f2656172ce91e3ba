//! Members reaching each other over gRPC: [`GrpcTransport`] (the client side of `Call` and
//! `Release` in `shoal.partition.v1`) and the conversions the server side shares.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::host::{CallError, CallReply, RefusalCode, Released, Transport};
use super::registry::Fence;
use crate::cluster::{Member, MemberId};
use crate::provider::remote::pb;
use crate::runtime::SharedClock;

/// The metadata key naming a refusal's [`RefusalCode`] on a gRPC status.
pub const REFUSAL_HEADER: &str = "shoal-refusal";

const CODES: [RefusalCode; 10] = [
    RefusalCode::NotAMember,
    RefusalCode::NotOwner,
    RefusalCode::StaleFence,
    RefusalCode::Draining,
    RefusalCode::Full,
    RefusalCode::Activating,
    RefusalCode::NotReleased,
    RefusalCode::OwnedHere,
    RefusalCode::Cancelled,
    RefusalCode::ActivationFailed,
];

pub(crate) fn fence_to(f: &Fence) -> pb::Fence {
    pb::Fence {
        epoch: f.epoch,
        version: f.version,
        owner_id: f.owner.to_string(),
    }
}

/// A request's fence, or `INVALID_ARGUMENT` naming the field.
pub(crate) fn fence_from(f: Option<&pb::Fence>, field: &str) -> Result<Fence, tonic::Status> {
    let f = f.ok_or_else(|| tonic::Status::invalid_argument(format!("{field} is required")))?;
    let owner = MemberId::parse(&f.owner_id).map_err(|e| {
        tonic::Status::invalid_argument(format!("{field}.owner_id {:?}: {e}", f.owner_id))
    })?;
    Ok(Fence {
        epoch: f.epoch,
        version: f.version,
        owner,
    })
}

/// The gRPC status for a host's error: the refusal's kind rides in [`REFUSAL_HEADER`].
pub(crate) fn status_of(e: CallError) -> tonic::Status {
    match e {
        CallError::Refused { code, detail } => {
            let grpc = match code {
                RefusalCode::NotOwner | RefusalCode::OwnedHere => tonic::Code::FailedPrecondition,
                RefusalCode::StaleFence | RefusalCode::Cancelled => tonic::Code::Aborted,
                RefusalCode::ActivationFailed => tonic::Code::FailedPrecondition,
                RefusalCode::Full => tonic::Code::ResourceExhausted,
                RefusalCode::NotAMember
                | RefusalCode::Draining
                | RefusalCode::Activating
                | RefusalCode::NotReleased => tonic::Code::Unavailable,
            };
            let mut meta = tonic::metadata::MetadataMap::new();
            meta.insert(
                REFUSAL_HEADER,
                tonic::metadata::MetadataValue::from_static(code.as_str()),
            );
            tonic::Status::with_metadata(grpc, detail, meta)
        }
        CallError::Invalid(m) => tonic::Status::invalid_argument(m),
        CallError::NoOwner { kind } => {
            tonic::Status::failed_precondition(format!("no member hosts kind {kind:?}"))
        }
        CallError::Unreachable { address, message } => {
            tonic::Status::unavailable(format!("{address}: {message}"))
        }
    }
}

/// A host's error from a gRPC status of the member at `address`.
fn error_of(address: &str, s: tonic::Status) -> CallError {
    let code = s
        .metadata()
        .get(REFUSAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| CODES.into_iter().find(|c| c.as_str() == v));
    match (code, s.code()) {
        (Some(code), _) => CallError::Refused {
            code,
            detail: s.message().to_string(),
        },
        (None, tonic::Code::InvalidArgument | tonic::Code::NotFound) => {
            CallError::Invalid(format!("{address}: {}", s.message()))
        }
        (None, c) => CallError::Unreachable {
            address: address.to_string(),
            message: format!("{c:?}: {}", s.message()),
        },
    }
}

type Client = pb::partition_service_client::PartitionServiceClient<tonic::transport::Channel>;

/// Clients by address, at most `limit` (the least recently opened is dropped first).
#[derive(Debug, Default)]
struct Pool {
    clients: BTreeMap<String, Client>,
    order: VecDeque<String>,
}

/// [`Transport`] over `shoal.partition.v1` (plaintext HTTP/2 to each member's advertised
/// address), with one lazily connected channel per member kept in a bounded pool.
#[derive(Debug)]
pub struct GrpcTransport {
    cluster: String,
    clock: SharedClock,
    timeout: Duration,
    limit: usize,
    pool: Mutex<Pool>,
}

impl GrpcTransport {
    /// A transport for `cluster`; each RPC is bounded by `timeout` on `clock`.
    pub fn new(cluster: impl Into<String>, clock: SharedClock, timeout: Duration) -> Self {
        Self {
            cluster: cluster.into(),
            clock,
            timeout,
            limit: 256,
            pool: Mutex::default(),
        }
    }

    fn client(&self, address: &str) -> Result<Client, CallError> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = pool.clients.get(address) {
            return Ok(c.clone());
        }
        let url = format!("http://{address}");
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| CallError::Invalid(format!("member address {url:?}: {e}")))?
            .connect_timeout(self.timeout)
            .connect_lazy();
        let client = Client::new(channel).max_decoding_message_size(super::MAX_PAYLOAD + 16 * 1024);
        pool.clients.insert(address.to_string(), client.clone());
        pool.order.push_back(address.to_string());
        while pool.clients.len() > self.limit {
            let Some(old) = pool.order.pop_front() else {
                break;
            };
            pool.clients.remove(&old);
        }
        Ok(client)
    }

    async fn bounded<T>(
        &self,
        address: &str,
        rpc: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CallError> {
        match crate::runtime::timeout(self.clock.as_ref(), self.timeout, rpc).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(error_of(address, s)),
            Err(_) => Err(CallError::Unreachable {
                address: address.to_string(),
                message: format!("no answer within {:?}", self.timeout),
            }),
        }
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    async fn call(
        &self,
        address: &str,
        kind: &str,
        identity: &str,
        fence: &Fence,
        payload: Vec<u8>,
    ) -> Result<CallReply, CallError> {
        let mut client = self.client(address)?;
        let req = pb::CallRequest {
            cluster: self.cluster.clone(),
            kind: kind.to_string(),
            identity: identity.to_string(),
            fence: Some(fence_to(fence)),
            payload,
        };
        let r = self.bounded(address, client.call(req)).await?;
        let bad = |m: String| CallError::Unreachable {
            address: address.to_string(),
            message: format!("malformed answer: {m}"),
        };
        let held = fence_from(r.held.as_ref(), "held").map_err(|s| bad(s.message().to_string()))?;
        Ok(CallReply {
            served_by: MemberId::parse(&r.served_by).map_err(|e| bad(e.to_string()))?,
            held,
            activated: r.activated,
            payload: r.payload,
            generation: r.generation,
        })
    }

    async fn release(
        &self,
        member: &Member,
        kind: &str,
        identity: &str,
        claim: &Fence,
        address: &str,
    ) -> Result<Released, CallError> {
        let mut client = self.client(&member.address)?;
        let req = pb::ReleaseRequest {
            cluster: self.cluster.clone(),
            kind: kind.to_string(),
            identity: identity.to_string(),
            claim: Some(fence_to(claim)),
            claimant_address: address.to_string(),
        };
        let r = self.bounded(&member.address, client.release(req)).await?;
        let settled = if r.settled_by.is_empty() {
            None
        } else {
            let by = MemberId::parse(&r.settled_by).map_err(|e| CallError::Unreachable {
                address: member.address.clone(),
                message: format!("malformed answer: settled_by {:?}: {e}", r.settled_by),
            })?;
            Some((by, r.settled_generation))
        };
        let answered_as = if r.answered_as.is_empty() {
            None
        } else {
            Some(
                MemberId::parse(&r.answered_as).map_err(|e| CallError::Unreachable {
                    address: member.address.clone(),
                    message: format!("malformed answer: answered_as {:?}: {e}", r.answered_as),
                })?,
            )
        };
        Ok(Released {
            answered_as,
            was_active: r.was_active,
            handed: r.has_handed_state.then_some(r.handed_state),
            generation: r.generation,
            settled,
            under: (r.held_epoch, r.held_version),
            lost: r.lost_with_membership,
        })
    }

    async fn settle(
        &self,
        member: &Member,
        kind: &str,
        identity: &str,
        generation: u64,
        claimant: &MemberId,
    ) -> Result<bool, CallError> {
        let mut client = self.client(&member.address)?;
        let req = pb::SettleRequest {
            cluster: self.cluster.clone(),
            kind: kind.to_string(),
            identity: identity.to_string(),
            generation,
            claimant: claimant.to_string(),
        };
        let r = self.bounded(&member.address, client.settle(req)).await?;
        Ok(r.settled)
    }
}
