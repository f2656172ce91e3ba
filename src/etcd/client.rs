//! The production [`EtcdApi`]: the `etcd-client` crate against a real etcd (normal build).
//!
//! Keep-alives go over one lease keep-alive stream per lease, reopened whenever it fails
//! (etcd-client never reopens one by itself, and a dead stream renews nothing). Watches ask
//! for progress notifications every [`PROGRESS_EVERY`], so a stream that silently died is
//! noticed by the provider's idle timeout.

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
            .client
            .clone()
            .lease_grant(secs, None)
            .await
            .map_err(etcd_error)?;
        Ok((r.id(), Duration::from_secs(r.ttl().max(1) as u64)))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, EtcdError> {
        // One stream per lease, taken out while in use and put back if it worked.
        let held = self.keepers().remove(&lease);
        let (mut keeper, mut stream) = match held {
            Some(pair) => pair,
            None => self
                .client
                .clone()
                .lease_keep_alive(lease)
                .await
                .map_err(etcd_error)?,
        };
        keeper.keep_alive().await.map_err(etcd_error)?;
        let answer = stream
            .message()
            .await
            .map_err(etcd_error)?
            .ok_or_else(|| EtcdError::Unavailable("the keep-alive stream ended".into()))?;
        if answer.ttl() <= 0 {
            return Err(EtcdError::LeaseNotFound(lease));
        }
        self.keepers().insert(lease, (keeper, stream));
        Ok(Duration::from_secs(answer.ttl() as u64))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.keepers().remove(&lease);
        match self.client.clone().lease_revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) => Err(match etcd_error(e) {
                EtcdError::LeaseNotFound(_) => EtcdError::LeaseNotFound(lease),
                other => other,
            }),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, EtcdError> {
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        match self.client.clone().put(key, value, options).await {
            Ok(r) => Ok(r.header().map_or(0, |h| h.revision())),
            Err(e) => Err(match etcd_error(e) {
                EtcdError::LeaseNotFound(_) => EtcdError::LeaseNotFound(lease),
                other => other,
            }),
        }
    }

    async fn delete(&self, key: &str) -> Result<Revision, EtcdError> {
        let r = self
            .client
            .clone()
            .delete(key, None)
            .await
            .map_err(etcd_error)?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    async fn range_prefix(&self, prefix: &str) -> Result<Range, EtcdError> {
        let r = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_error)?;
        let header = r.header();
        Ok(Range {
            kvs: r.kvs().iter().map(kv).collect(),
            revision: header.map_or(0, |h| h.revision()),
            cluster_id: header.map_or(0, |h| h.cluster_id()),
        })
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, EtcdError> {
        let mut options = WatchOptions::new().with_prefix().with_progress_notify();
        if from > 0 {
            options = options.with_start_revision(from);
        }
        let stream = self
            .client
            .clone()
            .watch(prefix, Some(options))
            .await
            .map_err(etcd_error)?;
        Ok(Box::pin(futures::stream::unfold(
            Some(stream),
            move |state| async move {
                let mut stream = state?;
                loop {
                    let message = match tokio::time::timeout(PROGRESS_EVERY, stream.message()).await
                    {
                        Err(_) => {
                            // Quiet: ask for a progress notification (a dead stream
                            // fails here or stays quiet until the idle timeout).
                            if let Err(e) = stream.request_progress().await {
                                return Some((Err(etcd_error(e)), None));
                            }
                            continue;
                        }
                        Ok(m) => m,
                    };
                    let response = match message {
                        Ok(Some(r)) => r,
                        Ok(None) => return None,
                        Err(e) => return Some((Err(etcd_error(e)), None)),
                    };
                    if response.canceled() {
                        let error = if response.compact_revision() > 0 {
                            EtcdError::Compacted {
                                requested: from,
                                compacted: response.compact_revision(),
                            }
                        } else {
                            EtcdError::Unavailable(format!(
                                "watch cancelled: {}",
                                response.cancel_reason()
                            ))
                        };
                        return Some((Err(error), None));
                    }
                    if response.created() && response.events().is_empty() {
                        continue;
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
                    let batch = WatchBatch {
                        changes,
                        header_revision: response.header().map_or(0, |h| h.revision()),
                        cluster_id: response.header().map_or(0, |h| h.cluster_id()),
                    };
                    return Some((Ok(batch), Some(stream)));
                }
            },
        )))
    }
}
