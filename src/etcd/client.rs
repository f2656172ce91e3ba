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
//!
//! **Endpoints.** etcd-client balances requests over every endpoint it is given, and one dead
//! or frozen etcd member then fails the requests that land on it (a member would not even
//! start when the first endpoint it probed was the dead one). Like Go's clientv3, this client
//! talks to one endpoint at a time and moves to the next ([`EtcdClient::failovers`]) when that
//! one fails: it refuses connections, answers `Unavailable` or `no leader` (every request
//! carries `hasleader`, so an etcd member cut off from its quorum refuses instead of serving
//! a view that no longer moves), leaves a call unanswered until its caller gives up (a frozen
//! member), or leaves a watch without even a progress notification for two
//! [`PROGRESS_EVERY`]. A call that failed for its endpoint is tried once on each other
//! endpoint before its error is returned. Lease keep-alive streams are reopened on the new
//! endpoint; watches end with an error and the provider reopens them there, from its revision.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    WatchOptions,
};

use super::api::{
    Change, EtcdApi, EtcdError, KeyValue, LeaseId, Range, Revision, WatchBatch, WatchStream,
};
use super::endpoints::{EndpointMetrics, Endpoints, Fault, Transport, stale_token_message};
use crate::runtime::TokioClock;

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

/// [`EtcdApi`] over `etcd-client`, one endpoint at a time (the policy is
/// [`Endpoints`], shared with the simulator's client).
pub struct EtcdClient {
    endpoints: Arc<Endpoints<ClientTransport>>,
}

/// Counters of one etcd client (the endpoint policy's).
pub type EtcdClientMetrics = EndpointMetrics;

/// A lease's keep-alive stream and the endpoint it was opened on.
type Keeper = (usize, LeaseKeeper, LeaseKeepAliveStream);

/// etcd-client as the [`Transport`] of [`Endpoints`]: a `Client` per endpoint (it
/// authenticates at connect), and the lease keep-alive streams, each on the endpoint it was
/// opened on.
pub struct ClientTransport {
    urls: Vec<String>,
    options: ConnectOptions,
    authenticates: bool,
    keepers: Mutex<std::collections::BTreeMap<LeaseId, Keeper>>,
}

impl ClientTransport {
    fn keepers(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<LeaseId, Keeper>> {
        self.keepers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Transport for ClientTransport {
    type Conn = Client;
    type Error = etcd_client::Error;

    fn endpoints(&self) -> &[String] {
        &self.urls
    }

    async fn connect(&self, i: usize) -> Result<Client, etcd_client::Error> {
        Client::connect([self.urls[i].as_str()], Some(self.options.clone())).await
    }

    fn authenticates(&self) -> bool {
        self.authenticates
    }

    async fn authenticate(&self, conn: &Client) -> Result<(), etcd_client::Error> {
        // A new token, shared by every clone of that endpoint's client.
        conn.refresh_token().await
    }

    fn fault(&self, e: &etcd_client::Error) -> Fault {
        if endpoint_failed(e) {
            Fault::Endpoint
        } else if stale_token(e) {
            Fault::StaleToken
        } else {
            Fault::Request
        }
    }

    fn timed_out(&self, endpoint: &str, after: Duration) -> etcd_client::Error {
        etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{endpoint}: no answer within {after:?}"),
        ))
    }

    fn forget(&self, i: Option<usize>) {
        match i {
            Some(i) => self.keepers().retain(|_, (at, _, _)| *at != i),
            None => self.keepers().clear(),
        }
    }
}

/// Whether `e` says the endpoint, not the request, is at fault: it cannot be reached, is not
/// serving, or has no leader (an etcd member cut off from its quorum, or an election).
pub fn endpoint_failed(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) || s.message().contains("no leader")
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Whether etcd refused a request for its auth token, not for who sent it: the token is gone
/// (etcd restarted, the token's TTL passed) or predates a change of the auth store. Another
/// authentication fixes it.
pub fn stale_token(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => stale_token_message(s.message()),
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
        // Opening a keep-alive stream for a lease etcd does not have: etcd answers with no
        // TTL, which etcd-client turns into this error string (not a status).
        etcd_client::Error::LeaseKeepAliveError(m) if m == "lease not found" => {
            EtcdError::LeaseNotFound(0)
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
    /// A read of `key` with `options` as of store revision `revision`, etcd's mvcc errors
    /// (OutOfRange) mapped: a revision beyond the store's is [`EtcdError::WentBack`] (with the
    /// store's revision, read again), one below its compaction [`EtcdError::Compacted`].
    async fn read_at(
        &self,
        key: &str,
        options: GetOptions,
        revision: Revision,
    ) -> Result<etcd_client::GetResponse, EtcdError> {
        let read = |options: GetOptions| {
            self.call(move |mut c| {
                let (key, options) = (key.to_string(), options.clone());
                async move { c.get(key, Some(options)).await }
            })
        };
        match read(options.clone().with_revision(revision)).await {
            Ok(r) => Ok(r),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("future revision") => {
                let current = read(GetOptions::new().with_count_only())
                    .await
                    .map_err(etcd_error)?
                    .header()
                    .map_or(0, |h| h.revision());
                Err(EtcdError::WentBack {
                    requested: revision,
                    current,
                })
            }
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {
                Err(EtcdError::Compacted {
                    requested: revision,
                    compacted: revision,
                })
            }
            Err(e) => Err(etcd_error(e)),
        }
    }
    /// Connects to the first of `connection`'s endpoints that answers (and has a leader); the
    /// error names every endpoint tried and why it failed.
    pub async fn connect(connection: &EtcdConnection) -> Result<Self, EtcdError> {
        let connect_timeout = connection.connect_timeout.max(Duration::from_millis(100));
        let mut options = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
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
        if connection.endpoints.is_empty() {
            return Err(EtcdError::Rejected("no etcd endpoint given".into()));
        }
        let transport = ClientTransport {
            urls: connection.endpoints.clone(),
            options,
            authenticates: connection.user.is_some(),
            keepers: Mutex::default(),
        };
        let endpoints = Arc::new(Endpoints::new(
            transport,
            TokioClock::shared(),
            connect_timeout,
            EndpointMetrics::default(),
        )?);
        // The connection is lazy: ask each endpoint for its status, in order, until one
        // answers, so that a wrong endpoint fails here, named, and a dead one is passed over.
        let mut refusals = Vec::new();
        for (i, url) in connection.endpoints.iter().enumerate() {
            let probe = async {
                let mut client = endpoints.conn(i).await?;
                client.status().await
            };
            let error = match tokio::time::timeout(connect_timeout, probe).await {
                Ok(Ok(_)) => {
                    endpoints.set_current(i);
                    if !refusals.is_empty() {
                        tracing::warn!(endpoint = %url, passed_over = %refusals.join("; "), "etcd: started on a later endpoint");
                    }
                    return Ok(Self { endpoints });
                }
                Ok(Err(e)) => named(url, etcd_error(e)),
                Err(_) => EtcdError::Unavailable(format!(
                    "etcd at {url}: no answer within {:?}",
                    connection.connect_timeout
                )),
            };
            endpoints.disconnect(i);
            if connection.endpoints.len() == 1 {
                return Err(error);
            }
            refusals.push(error.to_string());
        }
        Err(EtcdError::Unavailable(format!(
            "no etcd endpoint answered: {}",
            refusals.join("; ")
        )))
    }

    /// The client's counters (register them with [`EndpointMetrics::register`]).
    pub fn metrics(&self) -> &EtcdClientMetrics {
        self.endpoints.metrics()
    }

    /// How many times the client moved from a failed endpoint to the next one.
    pub fn failovers(&self) -> u64 {
        self.metrics().failovers.get()
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &str {
        self.endpoints.name(self.endpoints.current())
    }

    /// How many times a call was refused for a stale auth token and authenticated again.
    pub fn reauthentications(&self) -> u64 {
        self.metrics().reauthentications.get()
    }

    /// Runs `op` on the endpoint in use, as [`Endpoints::call`] decides.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.endpoints.call(op).await
    }

    /// [`Self::call`] with `op` told which endpoint its client is for, also saying which
    /// endpoint answered.
    async fn call_on<T, F, Fut>(&self, op: F) -> Result<(usize, T), etcd_client::Error>
    where
        F: Fn(usize, Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.endpoints.call_on(op).await
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
        match self
            .call_on(|i, client| self.keep_alive_once(i, client, lease))
            .await
        {
            Ok((_, answer)) => answer,
            // A lost lease is reported as lost however etcd said it (an answer with no TTL,
            // or an error naming it).
            Err(e) => Err(match etcd_error(e) {
                EtcdError::LeaseNotFound(_) => EtcdError::LeaseNotFound(lease),
                other => other,
            }),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.endpoints.transport().keepers().remove(&lease);
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

    async fn count_prefix(&self, prefix: &str, revision: Revision) -> Result<i64, EtcdError> {
        let options = GetOptions::new().with_prefix().with_count_only();
        self.read_at(prefix, options, revision)
            .await
            .map(|r| r.count())
    }

    async fn mod_revision_at(
        &self,
        key: &str,
        revision: Revision,
    ) -> Result<Option<Revision>, EtcdError> {
        let options = GetOptions::new().with_keys_only();
        self.read_at(key, options, revision)
            .await
            .map(|r| r.kvs().first().map(|kv| kv.mod_revision()))
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, EtcdError> {
        let mut options = WatchOptions::new().with_prefix().with_progress_notify();
        if from > 0 {
            options = options.with_start_revision(from);
        }
        let mut retried = false;
        loop {
            let (endpoint, mut stream) = self
                .call_on(|_, mut c| {
                    let options = options.clone();
                    async move { c.watch(prefix, Some(options)).await }
                })
                .await
                .map_err(etcd_error)?;
            let on = Watched {
                endpoints: self.endpoints.clone(),
                endpoint,
            };
            // etcd answers a creation at once: created, or cancelled. A watch refused for a
            // stale auth token is cancelled (the call itself succeeded), so it is read here.
            let guard = self.endpoints.abandoned(endpoint);
            let first = stream.message().await;
            guard.disarm();
            let first = match first {
                Ok(Some(r)) => r,
                Ok(None) => return Err(EtcdError::Unavailable("the watch ended at once".into())),
                Err(e) => return Err(on.failed(e)),
            };
            // etcd accepts a watch from a revision it has not reached and waits for it; after
            // a restore with the same cluster id those revisions are reused by other writes,
            // which the watch would never deliver (phantom members, for good).
            // A member of a multi-member etcd may lag a little behind the one the view was
            // read from: a linearizable read (answered at the quorum's revision) confirms it.
            let created_at = first.header().map_or(0, |h| h.revision());
            if from > 0 && first.created() && !first.canceled() && created_at + 1 < from {
                let quorum = self
                    .call(|mut c| async move {
                        c.get(
                            prefix,
                            Some(GetOptions::new().with_prefix().with_count_only()),
                        )
                        .await
                    })
                    .await
                    .map_err(etcd_error)?;
                let current = quorum.header().map_or(0, |h| h.revision());
                if current + 1 < from {
                    return Err(EtcdError::WentBack {
                        requested: from,
                        current,
                    });
                }
                return Err(EtcdError::Unavailable(format!(
                    "the etcd member at {} is behind (at revision {created_at}, the quorum at {current})",
                    self.endpoints.name(endpoint)
                )));
            }
            if first.canceled() && first.cancel_reason().contains("no leader") {
                on.endpoints
                    .fail_over(endpoint, &"watch cancelled: no leader");
            }
            let stale = first.canceled()
                && ["invalid auth token", "auth store is old"]
                    .iter()
                    .any(|m| first.cancel_reason().contains(m));
            if stale && self.endpoints.transport().authenticates() && !retried {
                retried = true;
                let client = self.endpoints.conn(endpoint).await.map_err(etcd_error)?;
                self.endpoints
                    .reauthenticate(
                        &client,
                        &format!("watch cancelled: {}", first.cancel_reason()),
                    )
                    .await
                    .map_err(etcd_error)?;
                continue;
            }
            return Ok(watch_stream(stream, Some(first), from, on));
        }
    }
}

impl EtcdClient {
    /// One keep-alive over the lease's stream on endpoint `i`, whose client is `client`
    /// (opened if there is none, or if it was opened on another endpoint), taken out while in
    /// use and put back if it worked. The outer error is etcd-client's (to tell a stale token
    /// or a failed endpoint); the inner one is the provider's.
    async fn keep_alive_once(
        &self,
        i: usize,
        client: Client,
        lease: LeaseId,
    ) -> Result<Result<Duration, EtcdError>, etcd_client::Error> {
        let held = self
            .endpoints
            .transport()
            .keepers()
            .remove(&lease)
            .filter(|(at, _, _)| *at == i);
        let (mut keeper, mut stream) = match held {
            Some((_, keeper, stream)) => (keeper, stream),
            None => client.clone().lease_keep_alive(lease).await?,
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
        self.endpoints
            .transport()
            .keepers()
            .insert(lease, (i, keeper, stream));
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

/// The endpoint a watch stream was opened on, to move the client off it when the stream
/// fails for the endpoint's sake.
struct Watched {
    endpoints: Arc<Endpoints<ClientTransport>>,
    endpoint: usize,
}

impl Watched {
    /// `e`, after moving the client on if it says the endpoint failed.
    fn failed(&self, e: etcd_client::Error) -> EtcdError {
        if endpoint_failed(&e) {
            self.endpoints.fail_over(self.endpoint, &e);
        }
        etcd_error(e)
    }
}

/// A watch stream as the provider reads it: batches, progress asked for when quiet, a
/// cancellation for compaction as `Compacted`. `first` is a response already read. A stream
/// that answers nothing, not even the progress asked for, within two [`PROGRESS_EVERY`] ends
/// with an error (its etcd member is frozen or cut off), and the client moves to the next
/// endpoint; so does a watch cancelled for want of a leader.
fn watch_stream(
    stream: etcd_client::WatchStream,
    first: Option<etcd_client::WatchResponse>,
    from: Revision,
    on: Watched,
) -> WatchStream {
    Box::pin(futures::stream::unfold(
        Some((stream, first, on)),
        move |state| async move {
            let (mut stream, mut pending, on) = state?;
            let mut asked = false;
            loop {
                let response = match pending.take() {
                    Some(r) => r,
                    None => match tokio::time::timeout(PROGRESS_EVERY, stream.message()).await {
                        Err(_) if asked => {
                            let why = format!(
                                "etcd at {} sent nothing, not even the progress asked for, in {:?}",
                                on.endpoints.name(on.endpoint),
                                PROGRESS_EVERY * 2
                            );
                            on.endpoints.fail_over(on.endpoint, &why);
                            return Some((Err(EtcdError::Unavailable(why)), None));
                        }
                        Err(_) => {
                            // Quiet: ask for a progress notification (a dead stream
                            // fails here or stays quiet until the check above).
                            if let Err(e) = stream.request_progress().await {
                                return Some((Err(on.failed(e)), None));
                            }
                            asked = true;
                            continue;
                        }
                        Ok(Ok(Some(r))) => r,
                        Ok(Ok(None)) => return None,
                        Ok(Err(e)) => return Some((Err(on.failed(e)), None)),
                    },
                };
                asked = false;
                if response.canceled() && response.cancel_reason().contains("no leader") {
                    on.endpoints
                        .fail_over(on.endpoint, &"watch cancelled: no leader");
                }
                match read_response(&response, from) {
                    None => continue,
                    Some(Ok(batch)) => return Some((Ok(batch), Some((stream, None, on)))),
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
    fn an_endpoint_is_at_fault_when_unreachable_or_leaderless_not_when_it_refuses() {
        use etcd_client::Error::GRpcStatus;
        use tonic::Status;
        for e in [
            GRpcStatus(Status::unavailable("tcp connect error")),
            GRpcStatus(Status::deadline_exceeded("timed out")),
            GRpcStatus(Status::unknown("etcdserver: no leader")),
            etcd_client::Error::IoError(std::io::Error::other("reset")),
        ] {
            assert!(endpoint_failed(&e), "{e}");
        }
        for e in [
            GRpcStatus(Status::invalid_argument("etcdserver: invalid auth token")),
            GRpcStatus(Status::permission_denied("etcdserver: permission denied")),
            GRpcStatus(Status::not_found("etcdserver: requested lease not found")),
            etcd_client::Error::InvalidArgs("empty endpoints".into()),
        ] {
            assert!(!endpoint_failed(&e), "{e}");
        }
        // A lost lease is reported as lost whatever the stream's state: on a stream opened
        // for it (etcd-client's error string) or as a status.
        assert_eq!(
            etcd_error(etcd_client::Error::LeaseKeepAliveError(
                "lease not found".into()
            )),
            EtcdError::LeaseNotFound(0)
        );
        assert_eq!(
            etcd_error(GRpcStatus(Status::not_found(
                "etcdserver: requested lease not found"
            ))),
            EtcdError::LeaseNotFound(0)
        );
    }

    #[test]
    fn a_prefix_range_ends_where_etcd_says() {
        assert_eq!(prefix_end(b"/shoal/c/members/"), b"/shoal/c/members0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
