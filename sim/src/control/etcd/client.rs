//! The [`EtcdApi`] a simulated member uses: the library's endpoint policy
//! ([`shoal::etcd::endpoints::Endpoints`], the same code the production client runs) over the
//! simulated network to the etcd members' doors. One endpoint at a time, moved on when it
//! fails or a call to it is abandoned; a token refused as stale is renewed and the call tried
//! once more.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use shoal::etcd::api::{EtcdApi, EtcdError, LeaseId, Range, Revision, WatchBatch, WatchStream};
use shoal::etcd::endpoints::{EndpointMetrics, Endpoints, Fault, Transport, stale_token_message};
use shoal::runtime::TokioClock;

use super::door::{Call, Reply, Request, Token};
use crate::control::wire::{Payload, Pool};

type Answer = Result<Reply, EtcdError>;
type Item = Result<WatchBatch, EtcdError>;

fn unavailable(e: impl std::fmt::Display) -> EtcdError {
    EtcdError::Unavailable(format!("etcd: {e}"))
}

fn unexpected<T>(r: Reply) -> Result<T, EtcdError> {
    Err(unavailable(format!("unexpected reply {r:?}")))
}

/// A connection to one etcd member: its pooled connections and the token it authenticated
/// with (shared by its clones).
#[derive(Clone, Debug)]
pub struct SimConn {
    pool: Pool,
    token: Arc<Mutex<Option<Token>>>,
}

impl SimConn {
    fn call_of(&self, request: Request) -> Call {
        Call {
            token: *self.token.lock().unwrap_or_else(|e| e.into_inner()),
            request,
        }
    }

    fn answer(payload: Payload) -> Answer {
        *payload
            .downcast::<Answer>()
            .map_err(|_| unavailable("malformed reply"))?
    }

    async fn call(&self, request: Request) -> Answer {
        let call = self.call_of(request);
        Self::answer(self.pool.call(Box::new(call)).await.map_err(unavailable)?)
    }
}

/// The simulated network as the endpoint policy's transport.
#[derive(Debug)]
pub struct SimTransport {
    servers: Vec<SocketAddr>,
    names: Vec<String>,
    user: Option<(String, String)>,
}

#[async_trait]
impl Transport for SimTransport {
    type Conn = SimConn;
    type Error = EtcdError;

    fn endpoints(&self) -> &[String] {
        &self.names
    }

    async fn connect(&self, i: usize) -> Result<SimConn, EtcdError> {
        let conn = SimConn {
            pool: Pool::new(self.servers[i]),
            token: Arc::default(),
        };
        if self.user.is_some() {
            self.authenticate(&conn).await?;
        }
        Ok(conn)
    }

    fn authenticates(&self) -> bool {
        self.user.is_some()
    }

    async fn authenticate(&self, conn: &SimConn) -> Result<(), EtcdError> {
        let (user, password) = self.user.clone().unwrap_or_default();
        match conn.call(Request::Authenticate(user, password)).await? {
            Reply::Token(t) => {
                *conn.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
                Ok(())
            }
            r => unexpected(r),
        }
    }

    fn fault(&self, e: &EtcdError) -> Fault {
        match e {
            EtcdError::Unavailable(_) => Fault::Endpoint,
            EtcdError::Rejected(m) if stale_token_message(m) => Fault::StaleToken,
            _ => Fault::Request,
        }
    }

    fn timed_out(&self, endpoint: &str, after: Duration) -> EtcdError {
        unavailable(format!("{endpoint}: no answer within {after:?}"))
    }
}

/// The [`EtcdApi`] a simulated node uses.
#[derive(Clone, Debug)]
pub struct SimEtcdApi {
    endpoints: Arc<Endpoints<SimTransport>>,
}

impl SimEtcdApi {
    /// Talks to the etcd members at `servers` (the first in use; at least one), authenticating
    /// as `user` when one is given.
    pub fn new(servers: Vec<SocketAddr>, user: Option<(String, String)>) -> Self {
        let names = servers.iter().map(|s| format!("http://{s}")).collect();
        let transport = SimTransport {
            servers,
            names,
            user,
        };
        let endpoints = Endpoints::new(
            transport,
            TokioClock::shared(),
            Duration::from_secs(1),
            EndpointMetrics::default(),
        )
        .expect("the simulated etcd has at least one member");
        Self {
            endpoints: Arc::new(endpoints),
        }
    }

    /// The endpoint policy's counters.
    pub fn metrics(&self) -> &EndpointMetrics {
        self.endpoints.metrics()
    }

    async fn call(&self, request: Request) -> Answer {
        self.endpoints
            .call(|conn| {
                let request = request.clone();
                async move { conn.call(request).await }
            })
            .await
    }
}

#[async_trait]
impl EtcdApi for SimEtcdApi {
    async fn lease_grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), EtcdError> {
        match self.call(Request::Grant(ttl)).await? {
            Reply::Granted(id, ttl) => Ok((id, ttl)),
            r => unexpected(r),
        }
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, EtcdError> {
        match self.call(Request::KeepAlive(lease)).await? {
            Reply::Kept(ttl) => Ok(ttl),
            r => unexpected(r),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        match self.call(Request::Revoke(lease)).await? {
            Reply::Done => Ok(()),
            r => unexpected(r),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, EtcdError> {
        match self.call(Request::Put(key.into(), value, lease)).await? {
            Reply::Written(r) => Ok(r),
            r => unexpected(r),
        }
    }

    async fn delete(&self, key: &str) -> Result<Revision, EtcdError> {
        match self.call(Request::Delete(key.into())).await? {
            Reply::Written(r) => Ok(r),
            r => unexpected(r),
        }
    }

    async fn range_prefix(&self, prefix: &str) -> Result<Range, EtcdError> {
        match self.call(Request::Range(prefix.into())).await? {
            Reply::Range(r) => Ok(r),
            r => unexpected(r),
        }
    }

    async fn count_prefix(&self, prefix: &str, revision: Revision) -> Result<i64, EtcdError> {
        match self.call(Request::Count(prefix.into(), revision)).await? {
            Reply::Count(n) => Ok(n),
            r => unexpected(r),
        }
    }

    async fn mod_revision_at(
        &self,
        key: &str,
        revision: Revision,
    ) -> Result<Option<Revision>, EtcdError> {
        match self
            .call(Request::ModRevision(key.into(), revision))
            .await?
        {
            Reply::ModRevision(r) => Ok(r),
            r => unexpected(r),
        }
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, EtcdError> {
        // Opened like any call (a stale token renewed, a failed member passed over); the
        // stream has a connection of its own.
        let conn = self
            .endpoints
            .call(|conn| {
                let call = conn.call_of(Request::Watch(prefix.into(), from));
                async move {
                    let (first, stream) =
                        conn.pool.open(Box::new(call)).await.map_err(unavailable)?;
                    SimConn::answer(first).map(|_| stream)
                }
            })
            .await?;
        Ok(Box::pin(futures::stream::unfold(
            conn,
            |mut conn| async move {
                let payload = conn.next().await?;
                let item = payload.downcast::<Item>().ok()?;
                Some((*item, conn))
            },
        )))
    }
}
