//! [`ActivationClient`]: calls an identity wherever it lives, from any node (member or client).

use std::sync::Arc;
use std::time::Duration;

use super::host::{ActivationHost, CallError, CallReply, Transport};
use super::lookup::{IdentityLookup, Located};
use crate::provider::ClusterProviderContext;

/// How an [`ActivationClient`] retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Most attempts per call (each looks the owner up again).
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub first_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            attempts: 6,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// One attempt of a call: where it went and with which fence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The owner it was routed to.
    pub to: Located,
    /// Its error, if it failed.
    pub error: Option<CallError>,
}

/// A call's outcome with the route it took.
#[derive(Clone, Debug)]
pub struct Called {
    /// The answer, or the last attempt's error.
    pub result: Result<CallReply, CallError>,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
}

/// Calls identities through an [`IdentityLookup`], locally when this node owns them and hosts
/// actors, over the [`Transport`] otherwise; retries refusals that a fresher view or a moment
/// fixes (not the owner, stale fence, moving, being activated, unreachable).
pub struct ActivationClient {
    ctx: ClusterProviderContext,
    lookup: Arc<dyn IdentityLookup>,
    host: Option<Arc<ActivationHost>>,
    transport: Arc<dyn Transport>,
    config: ClientConfig,
}

impl std::fmt::Debug for ActivationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationClient")
            .field("node", &self.ctx.member.id)
            .field("hosts", &self.host.is_some())
            .finish_non_exhaustive()
    }
}

impl ActivationClient {
    /// A client on the node of `ctx`; `host` is this node's own host, if it serves actors.
    pub fn new(
        ctx: ClusterProviderContext,
        lookup: Arc<dyn IdentityLookup>,
        host: Option<Arc<ActivationHost>>,
        transport: Arc<dyn Transport>,
        config: ClientConfig,
    ) -> Self {
        Self {
            ctx,
            lookup,
            host,
            transport,
            config,
        }
    }

    /// Calls `kind/identity` with `payload`, retrying as configured.
    pub async fn call(&self, kind: &str, identity: &str, payload: Vec<u8>) -> Called {
        let mut attempts = Vec::new();
        let mut backoff = self.config.first_backoff;
        loop {
            let Some(to) = self.lookup.get(kind, identity).await else {
                return Called {
                    result: Err(CallError::NoOwner {
                        kind: kind.to_string(),
                    }),
                    attempts,
                };
            };
            let result = self.attempt(&to, kind, identity, payload.clone()).await;
            let retry = match &result {
                Ok(_) => false,
                Err(CallError::Refused { code, .. }) => code.is_retried(),
                Err(CallError::Unreachable { .. }) => true,
                Err(CallError::NoOwner { .. }) | Err(CallError::Invalid(_)) => false,
            };
            attempts.push(Attempt {
                to,
                error: result.as_ref().err().cloned(),
            });
            if !retry || attempts.len() >= self.config.attempts as usize {
                return Called { result, attempts };
            }
            self.ctx.clock.sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    async fn attempt(
        &self,
        to: &Located,
        kind: &str,
        identity: &str,
        payload: Vec<u8>,
    ) -> Result<CallReply, CallError> {
        match &self.host {
            Some(host) if to.fence.owner == host.member_id() => {
                host.call(kind, identity, &to.fence, payload).await
            }
            _ => {
                self.transport
                    .call(&to.address, kind, identity, &to.fence, payload)
                    .await
            }
        }
    }
}
