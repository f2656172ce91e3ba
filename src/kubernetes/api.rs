//! The Kubernetes API boundary: the objects the provider uses and the calls it makes.
//!
//! Only the fields Shoal reads or writes are modelled; the production adapter converts them to
//! and from the k8s-openapi types. Resource versions are opaque strings, as the API says: they
//! are compared for equality (preconditions) and passed back (watch from), never ordered.

use std::collections::BTreeMap;
use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

/// Metadata common to every object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Object name, unique in its namespace and kind.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Labels (selectable).
    pub labels: BTreeMap<String, String>,
    /// Annotations (not selectable).
    pub annotations: BTreeMap<String, String>,
    /// Set by the server on every write; a write carrying one is a precondition.
    pub resource_version: String,
    /// Set by the server on create.
    pub uid: String,
    /// The object this one belongs to (garbage-collected with it).
    pub owner: Option<ObjectReference>,
}

/// A reference to another object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectReference {
    /// Kind, like `Pod`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

/// An API object with metadata.
pub trait Object: Clone + Send + Sync + 'static {
    /// The object's metadata.
    fn meta(&self) -> &ObjectMeta;
    /// The object's metadata, to change.
    fn meta_mut(&mut self) -> &mut ObjectMeta;
}

/// A `coordination.k8s.io/v1` Lease (times in microseconds since the Unix epoch, the API's
/// `MicroTime`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// Metadata.
    pub meta: ObjectMeta,
    /// Who holds it.
    pub holder_identity: Option<String>,
    /// How long a holder may go without renewing.
    pub lease_duration_seconds: Option<i32>,
    /// When the holder acquired it.
    pub acquire_time_micros: Option<i64>,
    /// When the holder last renewed it (written by the holder, on the holder's clock).
    pub renew_time_micros: Option<i64>,
    /// How many times it changed hands.
    pub lease_transitions: Option<i32>,
}

impl Object for Lease {
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Addresses (IPs) of the endpoint.
    pub addresses: Vec<String>,
    /// Ready for traffic (false while terminating).
    pub ready: Option<bool>,
    /// Serving (may stay true while terminating).
    pub serving: Option<bool>,
    /// Terminating.
    pub terminating: Option<bool>,
    /// Zone.
    pub zone: Option<String>,
    /// The Pod behind the endpoint.
    pub target_ref: Option<ObjectReference>,
}

/// A `discovery.k8s.io/v1` EndpointSlice (one of a Service's, labelled
/// `kubernetes.io/service-name`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Metadata.
    pub meta: ObjectMeta,
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
}

impl Object for EndpointSlice {
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Objects of one kind, as listed (one page of them), with the resource version to watch from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectList<T> {
    /// The objects.
    pub items: Vec<T>,
    /// The list's resource version: a watch from it sees every later change.
    pub resource_version: String,
    /// More objects follow: ask for them with this token (`None`: the last page).
    pub continue_token: Option<String>,
}

/// How to list: from which state, and in pages of how many objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Empty: the newest state (a quorum read, which the real API server serves from etcd);
    /// otherwise any state not older than this version (`resourceVersionMatch=NotOlderThan`,
    /// served from the API server's watch cache, as client-go's reflector relists). Not sent
    /// with `continue_token` (the token carries the version of the first page).
    pub resource_version: String,
    /// At most this many objects per page (`limit`; `None`: all at once).
    pub limit: Option<u32>,
    /// The previous page's token (`continue`): the next page of the same list. A token older
    /// than the server keeps is `410 Gone`.
    pub continue_token: Option<String>,
}

/// One watch event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent<T> {
    /// The object was created (or is new to this watch).
    Added(T),
    /// The object changed.
    Modified(T),
    /// The object was deleted (its last state).
    Deleted(T),
    /// Nothing changed up to this resource version (the watch's progress).
    Bookmark(String),
}

/// Why an API call failed, in the API's terms.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 409: the object changed since the resource version the write was based on.
    #[error("conflict: {0}")]
    Conflict(String),
    /// 409: an object with that name exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// 404.
    #[error("not found: {0}")]
    NotFound(String),
    /// 410: the resource version to watch from is older than the server keeps; relist.
    #[error("gone: {0}")]
    Gone(String),
    /// The API server could not be reached or did not answer in time.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// 403, 422 and the like: the request will not succeed as it is.
    #[error("rejected: {0}")]
    Rejected(String),
    /// 429: API Priority and Fairness shed the request (its priority level's queues are full);
    /// the client must not send it again before `retry_after` (the `Retry-After` header, also
    /// the `Status`'s `details.retryAfterSeconds`).
    #[error("too many requests (retry after {retry_after:?}): {message}")]
    TooManyRequests {
        /// The server's message.
        message: String,
        /// How long to wait before the next attempt (`None`: the server did not say).
        retry_after: Option<std::time::Duration>,
    },
}

impl ApiError {
    /// The longest `Retry-After` honoured: a server (or a proxy) asking for more is capped
    /// here, so a bad header cannot stop a member for good.
    pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

    /// How long the server asked the client to wait before trying again (capped at
    /// [`Self::MAX_RETRY_AFTER`]); `None` for every other error.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ApiError::TooManyRequests {
                retry_after: Some(d),
                ..
            } => Some((*d).min(Self::MAX_RETRY_AFTER)),
            _ => None,
        }
    }

    /// The pause before the next attempt: `backoff`, or longer if the server asked for it.
    pub fn retry_delay(&self, backoff: std::time::Duration) -> std::time::Duration {
        match self.retry_after() {
            Some(d) if !crate::runtime::sim::flaw("k8s-ignores-retry-after") => backoff.max(d),
            _ => backoff,
        }
    }
}

/// A stream of watch events; it ends when the server closes the watch.
pub type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<WatchEvent<T>, ApiError>> + Send>>;

/// Equality-based label selector (`key=value,...`); empty selects everything.
pub type LabelSelector = BTreeMap<String, String>;

/// Whether `labels` match `selector`.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The calls the Kubernetes provider makes. Production: kube-rs against a real API server;
/// tests and simulation: [`super::memory::MemoryApiServer`].
#[async_trait]
pub trait KubeApi: Send + Sync + 'static {
    /// Reads a Lease.
    async fn get_lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>, ApiError>;
    /// Creates a Lease (`AlreadyExists` if the name is taken).
    async fn create_lease(&self, lease: Lease) -> Result<Lease, ApiError>;
    /// Replaces a Lease; its `resource_version` is a precondition (`Conflict` if it changed).
    async fn replace_lease(&self, lease: Lease) -> Result<Lease, ApiError>;
    /// Deletes a Lease, only if its resource version is still `precondition` when given.
    async fn delete_lease(
        &self,
        namespace: &str,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<(), ApiError>;
    /// Lists (one page of) the Leases matching `selector` (see [`ListOptions`]).
    async fn list_leases(
        &self,
        namespace: &str,
        selector: &LabelSelector,
        options: &ListOptions,
    ) -> Result<ObjectList<Lease>, ApiError>;
    /// Watches the Leases matching `selector` from `resource_version` (with bookmarks).
    async fn watch_leases(
        &self,
        namespace: &str,
        selector: &LabelSelector,
        resource_version: &str,
    ) -> Result<WatchStream<Lease>, ApiError>;
    /// Lists (one page of) the EndpointSlices of Service `service` (see [`ListOptions`]).
    async fn list_endpoint_slices(
        &self,
        namespace: &str,
        service: &str,
        options: &ListOptions,
    ) -> Result<ObjectList<EndpointSlice>, ApiError>;
    /// Watches the EndpointSlices of Service `service` from `resource_version`.
    async fn watch_endpoint_slices(
        &self,
        namespace: &str,
        service: &str,
        resource_version: &str,
    ) -> Result<WatchStream<EndpointSlice>, ApiError>;
}
