//! The production [`EtcdApi`]: the `etcd-client` crate against a real etcd (normal build).
//!
//! Keep-alives go over one lease keep-alive stream per lease, reopened whenever it fails
//! (etcd-client never reopens one by itself, and a dead stream renews nothing). Watches ask
//! for progress notifications every [`PROGRESS_EVERY`], so a stream that silently died is
//! noticed by the provider's idle timeout.
//!
//! With authentication on, etcd-client authenticates once, at connect. etcd's simple tokens
//! live in its memory: after an etcd restart (or past `--auth-token-ttl`) every request is
//! refused with `invalid auth token`, for good. Like Go's clientv3, every call here that is
//! refused for its token authenticates again and is retried once
//! ([`EtcdClient::reauthentications`] counts it).

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    WatchOptions,
};

use super::api::{
    Change, EtcdApi, EtcdError, KeyValue, LeaseId, Range, Revision, WatchBatch, WatchStream,
};

/// How often an idle watch asks etcd for a progress notification.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Keys per range page: a member's value is at most about 35 KB (32 metadata entries of 1 KB),
/// so a page stays under the 4 MiB a gRPC client decodes.
pub const RANGE_PAGE: i64 = 100;

/// The end of the range of keys starting with `prefix` (etcd's rule: the prefix with its last
/// byte below 0xff incremented and what follows dropped; all 0xff: to the end, `\0`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// How to reach etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdConnection {
    /// Endpoints, like `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// User and password, when etcd has authentication on.
    pub user: Option<(String, String)>,
    /// TLS: PEM CA certificate, and an optional PEM client certificate and key (mTLS).
    pub tls: Option<EtcdTls>,
    /// Deadline to establish a connection.
    pub connect_timeout: Duration,
}

/// TLS settings of an etcd connection.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    /// The CA certificate (PEM).
    pub ca: Vec<u8>,
    /// A client certificate and its key (PEM), for etcd's `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The server name to verify (default: the endpoint's host).
    pub domain: Option<String>,
}

/// [`EtcdApi`] over `etcd-client`.
pub struct EtcdClient {
    client: Client,
    keepers: Mutex<std::collections::BTreeMap<LeaseId, (LeaseKeeper, LeaseKeepAliveStream)>>,
    /// Whether the connection authenticates (a user and password were given).
    authenticates: bool,
    reauthentications: std::sync::atomic::AtomicU64,
}

/// Whether etcd refused a request for its auth token, not for who sent it: the token is gone
/// (etcd restarted, the token's TTL passed) or predates a change of the auth store. Another
/// authentication fixes it.
pub fn stale_token(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            m.contains("invalid auth token") || m.contains("auth store is old")
        }
        _ => false,
    }
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient").finish_non_exhaustive()
    }
}

/// Maps an etcd-client error to what the provider acts on.
pub fn etcd_error(e: etcd_client::Error) -> EtcdError {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let message = s.message().to_string();
            if message.contains("requested lease not found") {
                // The id is not in the message; callers that know it replace it.
                return EtcdError::LeaseNotFound(0);
            }
            match s.code() {
                tonic::Code::Unauthenticated
                | tonic::Code::PermissionDenied
                | tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition => {
                    EtcdError::Rejected(format!("{:?}: {message}", s.code()))
                }
                code => EtcdError::Unavailable(format!("{code:?}: {message}")),
            }
        }
        etcd_client::Error::InvalidArgs(m) | etcd_client::Error::EndpointError(m) => {
            EtcdError::Rejected(m)
        }
        etcd_client::Error::InvalidUri(e) => EtcdError::Rejected(e.to_string()),
        other => EtcdError::Unavailable(other.to_string()),
    }
}

/// `e`, saying which endpoint it concerns.
fn named(endpoint: &str, e: EtcdError) -> EtcdError {
    match e {
        EtcdError::Rejected(m) => EtcdError::Rejected(format!("etcd at {endpoint}: {m}")),
        EtcdError::Unavailable(m) => EtcdError::Unavailable(format!("etcd at {endpoint}: {m}")),
        other => EtcdError::Unavailable(format!("etcd at {endpoint}: {other}")),
    }
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
        lease: k.lease(),
    }
}

impl EtcdClient {
    /// Connects to `connection`'s endpoints; the error names the first endpoint and why.
    pub async fn connect(connection: &EtcdConnection) -> Result<Self, EtcdError> {
        let first = connection.endpoints.first().cloned().unwrap_or_default();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(connection.connect_timeout.max(Duration::from_millis(100)))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some((user, password)) = &connection.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &connection.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(tls.ca.clone()));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert.clone(), key.clone()));
            }
            if let Some(d) = &tls.domain {
                t = t.domain_name(d.clone());
            }
            options = options.with_tls(t);
        }
        let client = Client::connect(&connection.endpoints, Some(options))
            .await
            .map_err(|e| named(&first, etcd_error(e)))?;
        // The connection is lazy: ask for the status so a wrong endpoint fails here, named.
        let probe = tokio::time::timeout(
            connection.connect_timeout.max(Duration::from_millis(100)),
            client.clone().status(),
        )
        .await;
        match probe {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(named(&first, etcd_error(e))),
            Err(_) => {
                return Err(EtcdError::Unavailable(format!(
                    "etcd at {first}: no answer within {:?}",
                    connection.connect_timeout
                )));
            }
        }
        Ok(Self {
            client,
            keepers: Mutex::default(),
            authenticates: connection.user.is_some(),
            reauthentications: Default::default(),
        })
    }

    /// How many times a call was refused for a stale auth token and authenticated again.
    pub fn reauthentications(&self) -> u64 {
        self.reauthentications
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `op`; if etcd refused it for a stale auth token, authenticates again (a new token,
    /// shared by every clone of the client) and runs it once more. A failed authentication (the
    /// user was removed, the password changed) is the error returned.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match op(self.client.clone()).await {
            Err(e) if self.authenticates && stale_token(&e) => {
                self.reauthenticate(&e).await?;
                op(self.client.clone()).await
            }
            result => result,
        }
    }

    async fn reauthenticate(
        &self,
        why: &(dyn std::fmt::Display + Sync),
    ) -> Result<(), etcd_client::Error> {
        self.reauthentications
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(error = %why, "etcd refused this client's auth token (etcd restarted, or the token expired); authenticating again");
        // Streams opened under the old token are dropped: they are reopened with the new one.
        self.keepers().clear();
        self.client.refresh_token().await.inspect_err(|e| {
            tracing::warn!(error = %e, "authenticating to etcd again failed");
        })
    }

    fn keepers(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::BTreeMap<LeaseId, (LeaseKeeper, LeaseKeepAliveStream)>,
    > {
        self.keepers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl EtcdApi for EtcdClient {
    async fn lease_grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), EtcdError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let r = self
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await
            .map_err(etcd_error)?;
        Ok((r.id(), Duration::from_secs(r.ttl().max(1) as u64)))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, EtcdError> {
        let mut retried = false;
        loop {
            match self.keep_alive_once(lease).await {
                Err(e) if self.authenticates && !retried && stale_token(&e) => {
                    retried = true;
                    self.reauthenticate(&e).await.map_err(etcd_error)?;
                }
                Err(e) => return Err(etcd_error(e)),
                Ok(answer) => return answer,
            }
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.keepers().remove(&lease);
        match self
            .call(|mut c| async move { c.lease_revoke(lease).await })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(match etcd_error(e) {
                EtcdError::LeaseNotFound(_) => EtcdError::LeaseNotFound(lease),
                other => other,
            }),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, EtcdError> {
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let put = |mut c: Client| {
            let (value, options) = (value.clone(), options.clone());
            async move { c.put(key, value, options).await }
        };
        match self.call(put).await {
            Ok(r) => Ok(r.header().map_or(0, |h| h.revision())),
            Err(e) => Err(match etcd_error(e) {
                EtcdError::LeaseNotFound(_) => EtcdError::LeaseNotFound(lease),
                other => other,
            }),
        }
    }

    async fn delete(&self, key: &str) -> Result<Revision, EtcdError> {
        let r = self
            .call(|mut c| async move { c.delete(key, None).await })
            .await
            .map_err(etcd_error)?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    async fn range_prefix(&self, prefix: &str) -> Result<Range, EtcdError> {
        // In pages of RANGE_PAGE keys, every page at the first page's revision: one consistent
        // read, never one response above the 4 MiB a gRPC client decodes (about 10-14k members
        // in one range, fewer with metadata).
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut range = Range {
            kvs: Vec::new(),
            revision: 0,
            cluster_id: 0,
        };
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(RANGE_PAGE);
            if range.revision > 0 {
                options = options.with_revision(range.revision);
            }
            let r = self
                .call(|mut c| {
                    let (key, options) = (from.clone(), options.clone());
                    async move { c.get(key, Some(options)).await }
                })
                .await
                .map_err(etcd_error)?;
            if range.revision == 0 {
                let header = r.header();
                range.revision = header.map_or(0, |h| h.revision());
                range.cluster_id = header.map_or(0, |h| h.cluster_id());
            }
            range.kvs.extend(r.kvs().iter().map(kv));
            match r.kvs().last() {
                Some(last) if r.more() => {
                    // The next key after the last one: the same bytes and a zero byte.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(range),
            }
        }
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, EtcdError> {
        let mut options = WatchOptions::new().with_prefix().with_progress_notify();
        if from > 0 {
            options = options.with_start_revision(from);
        }
        let mut retried = false;
        loop {
            let mut stream = self
                .call(|mut c| {
                    let options = options.clone();
                    async move { c.watch(prefix, Some(options)).await }
                })
                .await
                .map_err(etcd_error)?;
            // etcd answers a creation at once: created, or cancelled. A watch refused for a
            // stale auth token is cancelled (the call itself succeeded), so it is read here.
            let first = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(EtcdError::Unavailable("the watch ended at once".into())),
                Err(e) => return Err(etcd_error(e)),
            };
            let stale = first.canceled()
                && ["invalid auth token", "auth store is old"]
                    .iter()
                    .any(|m| first.cancel_reason().contains(m));
            if stale && self.authenticates && !retried {
                retried = true;
                self.reauthenticate(&format!("watch cancelled: {}", first.cancel_reason()))
                    .await
                    .map_err(etcd_error)?;
                continue;
            }
            return Ok(watch_stream(stream, Some(first), from));
        }
    }
}

impl EtcdClient {
    /// One keep-alive over the lease's stream (opened if there is none), taken out while in
    /// use and put back if it worked. The outer error is etcd-client's (to tell a stale token);
    /// the inner one is the provider's.
    async fn keep_alive_once(
        &self,
        lease: LeaseId,
    ) -> Result<Result<Duration, EtcdError>, etcd_client::Error> {
        let held = self.keepers().remove(&lease);
        let (mut keeper, mut stream) = match held {
            Some(pair) => pair,
            None => self.client.clone().lease_keep_alive(lease).await?,
        };
        keeper.keep_alive().await?;
        let Some(answer) = stream.message().await? else {
            return Ok(Err(EtcdError::Unavailable(
                "the keep-alive stream ended".into(),
            )));
        };
        if answer.ttl() <= 0 {
            return Ok(Err(EtcdError::LeaseNotFound(lease)));
        }
        self.keepers().insert(lease, (keeper, stream));
        Ok(Ok(Duration::from_secs(answer.ttl() as u64)))
    }
}

/// What one watch response means to the provider: nothing (a creation without events), a
/// batch, or the end (cancelled: compacted, or refused).
fn read_response(
    response: &etcd_client::WatchResponse,
    from: Revision,
) -> Option<Result<WatchBatch, EtcdError>> {
    if response.canceled() {
        let error = if response.compact_revision() > 0 {
            EtcdError::Compacted {
                requested: from,
                compacted: response.compact_revision(),
            }
        } else {
            EtcdError::Unavailable(format!("watch cancelled: {}", response.cancel_reason()))
        };
        return Some(Err(error));
    }
    if response.created() && response.events().is_empty() {
        return None;
    }
    let changes = response
        .events()
        .iter()
        .filter_map(|e| {
            let k = e.kv()?;
            Some(match e.event_type() {
                EventType::Put => Change::Put(kv(k)),
                EventType::Delete => Change::Delete {
                    key: String::from_utf8_lossy(k.key()).into_owned(),
                    revision: k.mod_revision(),
                },
            })
        })
        .collect();
    Some(Ok(WatchBatch {
        changes,
        header_revision: response.header().map_or(0, |h| h.revision()),
        cluster_id: response.header().map_or(0, |h| h.cluster_id()),
    }))
}

/// A watch stream as the provider reads it: batches, progress asked for when quiet, a
/// cancellation for compaction as `Compacted`. `first` is a response already read.
fn watch_stream(
    stream: etcd_client::WatchStream,
    first: Option<etcd_client::WatchResponse>,
    from: Revision,
) -> WatchStream {
    Box::pin(futures::stream::unfold(
        Some((stream, first)),
        move |state| async move {
            let (mut stream, mut pending) = state?;
            loop {
                let response = match pending.take() {
                    Some(r) => r,
                    None => match tokio::time::timeout(PROGRESS_EVERY, stream.message()).await {
                        Err(_) => {
                            // Quiet: ask for a progress notification (a dead stream
                            // fails here or stays quiet until the idle timeout).
                            if let Err(e) = stream.request_progress().await {
                                return Some((Err(etcd_error(e)), None));
                            }
                            continue;
                        }
                        Ok(Ok(Some(r))) => r,
                        Ok(Ok(None)) => return None,
                        Ok(Err(e)) => return Some((Err(etcd_error(e)), None)),
                    },
                };
                match read_response(&response, from) {
                    None => continue,
                    Some(Ok(batch)) => return Some((Ok(batch), Some((stream, None)))),
                    Some(Err(e)) => return Some((Err(e), None)),
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_where_etcd_says() {
        assert_eq!(prefix_end(b"/shoal/c/members/"), b"/shoal/c/members0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
