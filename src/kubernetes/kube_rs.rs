//! The production [`KubeApi`]: kube-rs list, watch and write calls against a real API server
//! (normal build only). Only calls: the list / watch / relist logic is the provider's own
//! ([`super::watch::Reflector`]), so the simulator tests the logic production runs.
//!
//! The conversions to and from the k8s-openapi types are public so that test doubles speaking
//! the real wire format can reuse them.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1 as coordination;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions, WatchParams};

use super::api::{
    ApiError, Endpoint, EndpointSlice, KubeApi, LabelSelector, Lease, ListOptions, ObjectList,
    ObjectMeta, ObjectReference, SERVICE_NAME_LABEL, WatchEvent, WatchStream,
};

/// Server-side timeout asked for each watch (the API server ends the watch then; the provider
/// resumes from the version held). Below the API server's own limit.
const WATCH_TIMEOUT_SECS: u32 = 290;

/// [`KubeApi`] over a kube-rs [`kube::Client`].
#[derive(Clone)]
pub struct KubeRsApi {
    client: kube::Client,
}

impl std::fmt::Debug for KubeRsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRsApi").finish_non_exhaustive()
    }
}

impl KubeRsApi {
    /// Talks through `client`. Build it from a [`kube::Config`] with `default_retry` off (as
    /// [`Self::from_config`] does): kube-rs's own retry layer retries 429, 503 and 504 up to 15
    /// times inside one call, which the provider's request deadline then cuts short, and
    /// hides from the provider the `Retry-After` it honours itself.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// A client from `config`, with kube-rs's retry layer off: the provider retries every call
    /// itself, on its own clock and deadlines, waiting at least a 429's `Retry-After`.
    pub fn from_config(mut config: kube::Config) -> Result<Self, ApiError> {
        config.default_retry = false;
        kube::Client::try_from(config)
            .map(Self::new)
            .map_err(|e| ApiError::Unavailable(format!("cannot build a Kubernetes client: {e}")))
    }

    /// The in-cluster client (service account token, `KUBERNETES_SERVICE_HOST`), or the local
    /// kubeconfig outside a cluster.
    pub async fn from_environment() -> Result<Self, ApiError> {
        let config = kube::Config::infer().await.map_err(|e| {
            ApiError::Unavailable(format!("no Kubernetes client configuration: {e}"))
        })?;
        Self::from_config(config)
    }

    fn leases(&self, namespace: &str) -> Api<coordination::Lease> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn slices(&self, namespace: &str) -> Api<discovery::EndpointSlice> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

/// A list's parameters: the selector, the page (`limit`, `continue`), and "not older than" the
/// resource version when one is given on a first page (served from the API server's watch
/// cache; empty: a quorum read from etcd).
fn list_params(labels: &str, options: &ListOptions) -> ListParams {
    let mut params = ListParams::default().labels(labels);
    if let Some(limit) = options.limit {
        params = params.limit(limit);
    }
    if let Some(token) = &options.continue_token {
        return params.continue_token(token);
    }
    if options.resource_version.is_empty() {
        params
    } else {
        params
            .at(&options.resource_version)
            .matching(kube::api::VersionMatch::NotOlderThan)
    }
}

/// The label selector's query form (`k=v,k2=v2`).
fn selector_text(selector: &LabelSelector) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// An error of `verb` on `resource`, in the provider's terms; the text names both.
pub fn api_error(verb: &str, resource: &str, e: kube::Error) -> ApiError {
    let text = |msg: &dyn std::fmt::Display| format!("{verb} {resource}: {msg}");
    match e {
        kube::Error::Api(status) => status_error(verb, resource, &status),
        other => ApiError::Unavailable(text(&other)),
    }
}

/// A `Status` the API server answered, in the provider's terms.
pub fn status_error(verb: &str, resource: &str, status: &kube::core::Status) -> ApiError {
    let text = format!(
        "{verb} {resource}: {} ({} {})",
        status.message, status.code, status.reason
    );
    match status.code {
        404 => ApiError::NotFound(text),
        409 if status.reason == "AlreadyExists" => ApiError::AlreadyExists(text),
        409 => ApiError::Conflict(text),
        410 => ApiError::Gone(text),
        // API Priority and Fairness: the wait comes in the Status (the Retry-After header's
        // value), 0 when the server gave none.
        429 => ApiError::TooManyRequests {
            message: text,
            retry_after: status
                .details
                .as_ref()
                .map(|d| d.retry_after_seconds)
                .filter(|s| *s > 0)
                .map(|s| std::time::Duration::from_secs(u64::from(s))),
        },
        500.. => ApiError::Unavailable(text),
        _ => ApiError::Rejected(text),
    }
}

fn micros_to_time(micros: Option<i64>) -> Option<meta::MicroTime> {
    micros
        .and_then(|m| k8s_openapi::jiff::Timestamp::from_microsecond(m).ok())
        .map(meta::MicroTime)
}

fn meta_to_k8s(m: &ObjectMeta) -> meta::ObjectMeta {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    meta::ObjectMeta {
        name: non_empty(&m.name),
        namespace: non_empty(&m.namespace),
        labels: (!m.labels.is_empty()).then(|| m.labels.clone()),
        annotations: (!m.annotations.is_empty()).then(|| m.annotations.clone()),
        resource_version: non_empty(&m.resource_version),
        uid: non_empty(&m.uid),
        owner_references: m.owner.as_ref().map(|o| {
            vec![meta::OwnerReference {
                api_version: "v1".into(),
                kind: o.kind.clone(),
                name: o.name.clone(),
                uid: o.uid.clone(),
                controller: None,
                block_owner_deletion: None,
            }]
        }),
        ..meta::ObjectMeta::default()
    }
}

fn meta_from_k8s(m: meta::ObjectMeta) -> ObjectMeta {
    let namespace = m.namespace.unwrap_or_default();
    ObjectMeta {
        owner: m.owner_references.and_then(|refs| {
            refs.into_iter().next().map(|o| ObjectReference {
                kind: o.kind,
                namespace: namespace.clone(),
                name: o.name,
                uid: o.uid,
            })
        }),
        name: m.name.unwrap_or_default(),
        namespace,
        labels: m.labels.unwrap_or_default(),
        annotations: m.annotations.unwrap_or_default(),
        resource_version: m.resource_version.unwrap_or_default(),
        uid: m.uid.unwrap_or_default(),
    }
}

/// A Lease as the API types it.
pub fn lease_to_k8s(l: &Lease) -> coordination::Lease {
    coordination::Lease {
        metadata: meta_to_k8s(&l.meta),
        spec: Some(coordination::LeaseSpec {
            holder_identity: l.holder_identity.clone(),
            lease_duration_seconds: l.lease_duration_seconds,
            acquire_time: micros_to_time(l.acquire_time_micros),
            renew_time: micros_to_time(l.renew_time_micros),
            lease_transitions: l.lease_transitions,
            ..coordination::LeaseSpec::default()
        }),
    }
}

/// A Lease from the API types.
pub fn lease_from_k8s(l: coordination::Lease) -> Lease {
    let spec = l.spec.unwrap_or_default();
    Lease {
        meta: meta_from_k8s(l.metadata),
        holder_identity: spec.holder_identity,
        lease_duration_seconds: spec.lease_duration_seconds,
        acquire_time_micros: spec.acquire_time.map(|t| t.0.as_microsecond()),
        renew_time_micros: spec.renew_time.map(|t| t.0.as_microsecond()),
        lease_transitions: spec.lease_transitions,
    }
}

/// An EndpointSlice as the API types it.
pub fn slice_to_k8s(s: &EndpointSlice) -> discovery::EndpointSlice {
    discovery::EndpointSlice {
        metadata: meta_to_k8s(&s.meta),
        address_type: "IPv4".into(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| discovery::Endpoint {
                addresses: e.addresses.clone(),
                conditions: Some(discovery::EndpointConditions {
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                }),
                zone: e.zone.clone(),
                target_ref: e.target_ref.as_ref().map(|r| {
                    k8s_openapi::api::core::v1::ObjectReference {
                        kind: Some(r.kind.clone()),
                        namespace: Some(r.namespace.clone()),
                        name: Some(r.name.clone()),
                        uid: Some(r.uid.clone()),
                        ..Default::default()
                    }
                }),
                ..discovery::Endpoint::default()
            })
            .collect(),
        ports: None,
    }
}

/// An EndpointSlice from the API types.
pub fn slice_from_k8s(s: discovery::EndpointSlice) -> EndpointSlice {
    EndpointSlice {
        meta: meta_from_k8s(s.metadata),
        endpoints: s
            .endpoints
            .into_iter()
            .map(|e| {
                let c = e.conditions.unwrap_or_default();
                Endpoint {
                    addresses: e.addresses,
                    ready: c.ready,
                    serving: c.serving,
                    terminating: c.terminating,
                    zone: e.zone,
                    target_ref: e.target_ref.map(|r| ObjectReference {
                        kind: r.kind.unwrap_or_default(),
                        namespace: r.namespace.unwrap_or_default(),
                        name: r.name.unwrap_or_default(),
                        uid: r.uid.unwrap_or_default(),
                    }),
                }
            })
            .collect(),
    }
}

/// A kube-rs watch stream as the provider's: errors in the stream (a `410 Gone` event) end it.
fn watch_stream<K, T>(
    stream: impl futures::Stream<Item = kube::Result<kube::core::WatchEvent<K>>> + Send + 'static,
    convert: fn(K) -> T,
    resource: String,
) -> WatchStream<T>
where
    K: Send + 'static,
    T: Send + 'static,
{
    Box::pin(stream.map(move |item| match item {
        Ok(kube::core::WatchEvent::Added(o)) => Ok(WatchEvent::Added(convert(o))),
        Ok(kube::core::WatchEvent::Modified(o)) => Ok(WatchEvent::Modified(convert(o))),
        Ok(kube::core::WatchEvent::Deleted(o)) => Ok(WatchEvent::Deleted(convert(o))),
        Ok(kube::core::WatchEvent::Bookmark(b)) => {
            Ok(WatchEvent::Bookmark(b.metadata.resource_version))
        }
        Ok(kube::core::WatchEvent::Error(status)) => Err(status_error("watch", &resource, &status)),
        Err(e) => Err(api_error("watch", &resource, e)),
    }))
}

#[async_trait]
impl KubeApi for KubeRsApi {
    async fn get_lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>, ApiError> {
        self.leases(namespace)
            .get_opt(name)
            .await
            .map(|l| l.map(lease_from_k8s))
            .map_err(|e| api_error("get", &format!("Lease {namespace}/{name}"), e))
    }

    async fn create_lease(&self, lease: Lease) -> Result<Lease, ApiError> {
        let resource = format!("Lease {}/{}", lease.meta.namespace, lease.meta.name);
        self.leases(&lease.meta.namespace)
            .create(&PostParams::default(), &lease_to_k8s(&lease))
            .await
            .map(lease_from_k8s)
            .map_err(|e| api_error("create", &resource, e))
    }

    async fn replace_lease(&self, lease: Lease) -> Result<Lease, ApiError> {
        let resource = format!("Lease {}/{}", lease.meta.namespace, lease.meta.name);
        self.leases(&lease.meta.namespace)
            .replace(
                &lease.meta.name,
                &PostParams::default(),
                &lease_to_k8s(&lease),
            )
            .await
            .map(lease_from_k8s)
            .map_err(|e| api_error("update", &resource, e))
    }

    async fn delete_lease(
        &self,
        namespace: &str,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<(), ApiError> {
        let params = DeleteParams {
            preconditions: precondition.map(|rv| Preconditions {
                resource_version: Some(rv.to_string()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        self.leases(namespace)
            .delete(name, &params)
            .await
            .map(|_| ())
            .map_err(|e| api_error("delete", &format!("Lease {namespace}/{name}"), e))
    }

    async fn list_leases(
        &self,
        namespace: &str,
        selector: &LabelSelector,
        options: &ListOptions,
    ) -> Result<ObjectList<Lease>, ApiError> {
        let labels = selector_text(selector);
        let list = self
            .leases(namespace)
            .list(&list_params(&labels, options))
            .await
            .map_err(|e| api_error("list", &format!("Leases in {namespace} ({labels})"), e))?;
        Ok(ObjectList {
            resource_version: list.metadata.resource_version.unwrap_or_default(),
            continue_token: list.metadata.continue_.filter(|c| !c.is_empty()),
            items: list.items.into_iter().map(lease_from_k8s).collect(),
        })
    }

    async fn watch_leases(
        &self,
        namespace: &str,
        selector: &LabelSelector,
        resource_version: &str,
    ) -> Result<WatchStream<Lease>, ApiError> {
        let labels = selector_text(selector);
        let resource = format!("Leases in {namespace} ({labels})");
        let params = WatchParams::default()
            .labels(&labels)
            .timeout(WATCH_TIMEOUT_SECS);
        let stream = self
            .leases(namespace)
            .watch(&params, resource_version)
            .await
            .map_err(|e| api_error("watch", &resource, e))?;
        Ok(watch_stream(stream.into_stream(), lease_from_k8s, resource))
    }

    async fn list_endpoint_slices(
        &self,
        namespace: &str,
        service: &str,
        options: &ListOptions,
    ) -> Result<ObjectList<EndpointSlice>, ApiError> {
        let labels = format!("{SERVICE_NAME_LABEL}={service}");
        let list = self
            .slices(namespace)
            .list(&list_params(&labels, options))
            .await
            .map_err(|e| {
                api_error(
                    "list",
                    &format!("EndpointSlices of Service {namespace}/{service}"),
                    e,
                )
            })?;
        Ok(ObjectList {
            resource_version: list.metadata.resource_version.unwrap_or_default(),
            continue_token: list.metadata.continue_.filter(|c| !c.is_empty()),
            items: list.items.into_iter().map(slice_from_k8s).collect(),
        })
    }

    async fn watch_endpoint_slices(
        &self,
        namespace: &str,
        service: &str,
        resource_version: &str,
    ) -> Result<WatchStream<EndpointSlice>, ApiError> {
        let labels = format!("{SERVICE_NAME_LABEL}={service}");
        let resource = format!("EndpointSlices of Service {namespace}/{service}");
        let params = WatchParams::default()
            .labels(&labels)
            .timeout(WATCH_TIMEOUT_SECS);
        let stream = self
            .slices(namespace)
            .watch(&params, resource_version)
            .await
            .map_err(|e| api_error("watch", &resource, e))?;
        Ok(watch_stream(stream.into_stream(), slice_from_k8s, resource))
    }
}

/// Labels as a map (helper for doubles parsing `labelSelector`): `k=v,k2=v2`.
pub fn parse_selector(text: &str) -> LabelSelector {
    text.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect::<BTreeMap<_, _>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_and_a_slice_round_trip_through_the_api_types() {
        let lease = Lease {
            meta: ObjectMeta {
                name: "c-m".into(),
                namespace: "ns".into(),
                labels: [("shoal.io/cluster".to_string(), "c".to_string())].into(),
                annotations: [("shoal.io/address".to_string(), "10.0.0.1:4000".to_string())].into(),
                resource_version: "42".into(),
                uid: "u-1".into(),
                owner: Some(ObjectReference {
                    kind: "Pod".into(),
                    namespace: "ns".into(),
                    name: "pod-1".into(),
                    uid: "u-pod".into(),
                }),
            },
            holder_identity: Some("m".into()),
            lease_duration_seconds: Some(15),
            acquire_time_micros: Some(1_700_000_000_000_001),
            renew_time_micros: Some(1_700_000_000_123_456),
            lease_transitions: Some(0),
        };
        assert_eq!(lease_from_k8s(lease_to_k8s(&lease)), lease);
        let slice = EndpointSlice {
            meta: ObjectMeta {
                name: "shop-x".into(),
                namespace: "ns".into(),
                labels: [(SERVICE_NAME_LABEL.to_string(), "shop".to_string())].into(),
                ..ObjectMeta::default()
            },
            endpoints: vec![Endpoint {
                addresses: vec!["10.0.0.1".into()],
                ready: Some(false),
                serving: Some(true),
                terminating: Some(true),
                zone: Some("z1".into()),
                target_ref: lease.meta.owner.clone(),
            }],
        };
        assert_eq!(slice_from_k8s(slice_to_k8s(&slice)), slice);
        assert_eq!(
            parse_selector("a=b, c=d"),
            [
                ("a".to_string(), "b".to_string()),
                ("c".to_string(), "d".to_string())
            ]
            .into()
        );
    }

    #[test]
    fn statuses_map_to_what_the_provider_does_next() {
        let status = |code: u16, reason: &str| kube::core::Status {
            code,
            reason: reason.into(),
            message: "m".into(),
            ..kube::core::Status::default()
        };
        let e = |code, reason| status_error("delete", "Lease ns/x", &status(code, reason));
        assert!(matches!(e(404, "NotFound"), ApiError::NotFound(_)));
        assert!(matches!(
            e(409, "AlreadyExists"),
            ApiError::AlreadyExists(_)
        ));
        assert!(matches!(e(409, "Conflict"), ApiError::Conflict(_)));
        assert!(matches!(e(410, "Expired"), ApiError::Gone(_)));
        let throttled = e(429, "TooManyRequests");
        assert!(
            matches!(throttled, ApiError::TooManyRequests { .. })
                && throttled.retry_after().is_none(),
            "{throttled:?}"
        );
        let mut with_wait = status(429, "TooManyRequests");
        with_wait.details = Some(kube::core::response::StatusDetails {
            name: String::new(),
            group: String::new(),
            kind: String::new(),
            uid: String::new(),
            causes: Vec::new(),
            retry_after_seconds: 3,
        });
        let throttled = status_error("list", "Leases in ns", &with_wait);
        assert_eq!(
            throttled.retry_after(),
            Some(std::time::Duration::from_secs(3))
        );
        assert_eq!(
            throttled.retry_delay(std::time::Duration::from_millis(100)),
            std::time::Duration::from_secs(3)
        );
        with_wait.details.as_mut().unwrap().retry_after_seconds = 86_400;
        assert_eq!(
            status_error("list", "Leases in ns", &with_wait).retry_after(),
            Some(ApiError::MAX_RETRY_AFTER),
            "a huge Retry-After is capped"
        );
        assert!(matches!(
            e(503, "ServiceUnavailable"),
            ApiError::Unavailable(_)
        ));
        let forbidden = e(403, "Forbidden");
        assert!(matches!(forbidden, ApiError::Rejected(_)));
        assert!(
            forbidden.to_string().contains("delete Lease ns/x"),
            "{forbidden}"
        );
    }
}
