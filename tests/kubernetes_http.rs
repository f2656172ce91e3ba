//! The kube-rs adapter over real HTTP, against a double of the Kubernetes API server that speaks
//! its REST and JSON wire format (normal build only): lists with resource versions, chunked
//! watch streams with bookmarks and `ERROR` events, `409` / `410` / `403` as `Status` objects,
//! label selection on the server. kube-rs's client, serialization and error handling run for
//! real; the double keeps its objects in [`MemoryApiServer`].
#![cfg(not(madsim))]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1 as coordination;
use serde_json::json;
use shoal::kubernetes::api::{
    ApiError, EndpointSlice, KubeApi, Lease, ListOptions, ObjectMeta, WatchEvent, WatchStream,
};
use shoal::kubernetes::kube_rs::{
    KubeRsApi, lease_from_k8s, lease_to_k8s, parse_selector, slice_to_k8s,
};
use shoal::kubernetes::members::CLUSTER_LABEL;
use shoal::kubernetes::memory::MemoryApiServer;
use shoal::kubernetes::{Heartbeats, KubernetesProvider, KubernetesProviderConfig};
use shoal::{ClusterProvider, ClusterProviderContext, ProviderError, TokioClock};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The API server double.
#[derive(Clone, Default)]
struct Double {
    server: MemoryApiServer,
    /// `verb resource` pairs refused with 403, like `create leases`.
    forbidden: Arc<Mutex<BTreeSet<String>>>,
    /// `verb resource` pairs shed with 429 (API Priority and Fairness): how many more times,
    /// and the `Retry-After` in seconds.
    throttled: Arc<Mutex<BTreeMap<String, (u32, u32)>>>,
    /// Every list, as `resource@resourceVersion` (empty: a quorum read).
    lists: Arc<Mutex<Vec<String>>>,
    /// Every request that reached the double: `verb resource`, when it arrived, and whether
    /// it was shed with 429.
    requests: Arc<Mutex<Vec<(String, std::time::Instant, bool)>>>,
    /// How the next watches of a resource are answered instead of served: `(watch verb
    /// resource, what, how many more times)`.
    odd_watches: Arc<Mutex<BTreeMap<String, (OddWatch, u32)>>>,
    /// Ends every open watch stream cleanly when bumped (an API server that drops its
    /// connections, or a load balancer's idle timeout).
    cut: Arc<Cut>,
}

/// A watch answered out of the ordinary.
#[derive(Clone, Copy, Debug)]
enum OddWatch {
    /// `200` and a stream that ends at once with no event (a server shedding watches, or a
    /// proxy that closes them).
    EndsAtOnce,
    /// `200` and an `ERROR` event with a `410` status: the version asked for is no longer in
    /// the watch cache (what the real server sends after a compaction).
    Gone,
}

/// The generation of open watch streams: each stream ends when it changes.
struct Cut(tokio::sync::watch::Sender<u64>);

impl Default for Cut {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(0).0)
    }
}

fn full(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .unwrap()
}

/// A `Status` object, as the API server answers failures.
fn status_json(code: u16, reason: &str, message: &str) -> serde_json::Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn failure(e: &ApiError) -> Response<Body> {
    if let ApiError::TooManyRequests { retry_after, .. } = e {
        // As API Priority and Fairness answers: the wait in the header and in the Status.
        let secs = retry_after.map_or(0, |d| d.as_secs());
        let mut body = status_json(429, "TooManyRequests", &e.to_string());
        body["details"] = json!({"retryAfterSeconds": secs});
        let mut response = full(StatusCode::TOO_MANY_REQUESTS, body);
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
        return response;
    }
    let (code, reason) = match e {
        ApiError::Conflict(_) => (409, "Conflict"),
        ApiError::AlreadyExists(_) => (409, "AlreadyExists"),
        ApiError::NotFound(_) => (404, "NotFound"),
        ApiError::Gone(_) => (410, "Expired"),
        ApiError::Unavailable(_) => (503, "ServiceUnavailable"),
        ApiError::Rejected(_) => (422, "Invalid"),
        ApiError::TooManyRequests { .. } => unreachable!("answered above"),
    };
    full(
        StatusCode::from_u16(code).unwrap(),
        status_json(code, reason, &e.to_string()),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(req: &Request<hyper::body::Incoming>, key: &str) -> Option<String> {
    req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| percent_decode(v))
    })
}

/// A watch as the API server streams it: one JSON object per line.
fn watch_body<T: Send + 'static>(
    stream: WatchStream<T>,
    kind: &'static str,
    api_version: &'static str,
    encode: fn(&T) -> serde_json::Value,
) -> Response<Body> {
    let lines = stream.scan(false, move |ended, item| {
        if *ended {
            return futures::future::ready(None);
        }
        let line = match item {
            Ok(WatchEvent::Added(o)) => json!({"type": "ADDED", "object": encode(&o)}),
            Ok(WatchEvent::Modified(o)) => json!({"type": "MODIFIED", "object": encode(&o)}),
            Ok(WatchEvent::Deleted(o)) => json!({"type": "DELETED", "object": encode(&o)}),
            Ok(WatchEvent::Bookmark(rv)) => json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": rv}
            }}),
            Err(e) => {
                *ended = true;
                let code = if matches!(e, ApiError::Gone(_)) {
                    410
                } else {
                    500
                };
                json!({"type": "ERROR", "object": status_json(code, "Expired", &e.to_string())})
            }
        };
        futures::future::ready(Some(Ok::<_, Infallible>(Frame::data(Bytes::from(
            format!("{line}\n"),
        )))))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed_unsync(StreamBody::new(lines)))
        .unwrap()
}

fn encode_lease(l: &Lease) -> serde_json::Value {
    serde_json::to_value(lease_to_k8s(l)).unwrap()
}

fn encode_slice(s: &EndpointSlice) -> serde_json::Value {
    serde_json::to_value(slice_to_k8s(s)).unwrap()
}

impl Double {
    fn forbid(&self, what: &str) {
        self.forbidden.lock().unwrap().insert(what.to_string());
    }

    /// The next `times` requests `what` (like `list leases`) are shed with 429 and
    /// `Retry-After: retry_after_secs`.
    fn throttle(&self, what: &str, times: u32, retry_after_secs: u32) {
        self.throttled
            .lock()
            .unwrap()
            .insert(what.to_string(), (times, retry_after_secs));
    }

    /// The next `times` watches `what` (like `watch leases`) are answered as `odd`.
    fn odd_watches(&self, what: &str, odd: OddWatch, times: u32) {
        self.odd_watches
            .lock()
            .unwrap()
            .insert(what.to_string(), (odd, times));
    }

    /// Ends every watch stream open now, cleanly (the client sees the response end).
    fn cut_watches(&self) {
        self.cut.0.send_modify(|g| *g += 1);
    }

    /// The next watch `what` answered out of the ordinary, if any.
    fn odd_watch(&self, what: &str) -> Option<OddWatch> {
        match self.odd_watches.lock().unwrap().get_mut(what) {
            Some((odd, left)) if *left > 0 => {
                *left -= 1;
                Some(*odd)
            }
            _ => None,
        }
    }

    /// A watch stream that ends when the watches are cut.
    fn cuttable<T: Send + 'static>(&self, stream: WatchStream<T>) -> WatchStream<T> {
        let mut cut = self.cut.0.subscribe();
        stream
            .take_until(async move {
                let _ = cut.changed().await;
            })
            .boxed()
    }

    /// When the requests `what` arrived, in order, and whether each was shed.
    fn arrivals(&self, what: &str) -> Vec<(std::time::Instant, bool)> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, _, _)| w == what)
            .map(|(_, t, shed)| (*t, *shed))
            .collect()
    }

    /// The gaps between each shed request `what` and the next one of its kind.
    fn waits_after_shedding(&self, what: &str) -> Vec<Duration> {
        let arrivals = self.arrivals(what);
        arrivals
            .windows(2)
            .filter(|w| w[0].1)
            .map(|w| w[1].0 - w[0].0)
            .collect()
    }

    async fn handle(
        self,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let path: Vec<String> = req.uri().path().split('/').map(String::from).collect();
        // ["", "apis", group, "v1", "namespaces", ns, resource, name?]
        let (group, ns, resource, name) = match path.as_slice() {
            [_, apis, group, _v, namespaces, ns, resource, rest @ ..]
                if apis == "apis" && namespaces == "namespaces" && rest.len() <= 1 =>
            {
                (
                    group.clone(),
                    ns.clone(),
                    resource.clone(),
                    rest.first().cloned(),
                )
            }
            _ => {
                return Ok(full(
                    StatusCode::NOT_FOUND,
                    status_json(404, "NotFound", "no such path"),
                ));
            }
        };
        let watch = query(&req, "watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (req.method().clone(), name.is_some(), watch) {
            (Method::GET, false, true) => "watch",
            (Method::GET, false, false) => "list",
            (Method::GET, true, _) => "get",
            (Method::POST, false, _) => "create",
            (Method::PUT, true, _) => "update",
            (Method::DELETE, true, _) => "delete",
            _ => {
                return Ok(full(
                    StatusCode::METHOD_NOT_ALLOWED,
                    status_json(405, "MethodNotAllowed", "no"),
                ));
            }
        };
        let what = format!("{verb} {resource}");
        let arrived = std::time::Instant::now();
        let shed = match self.throttled.lock().unwrap().get_mut(&what) {
            Some((left, secs)) if *left > 0 => {
                *left -= 1;
                Some(*secs)
            }
            _ => None,
        };
        self.requests
            .lock()
            .unwrap()
            .push((what.clone(), arrived, shed.is_some()));
        if let Some(secs) = shed {
            return Ok(failure(&ApiError::TooManyRequests {
                message: format!("too many requests, please try again later ({what})"),
                retry_after: Some(Duration::from_secs(u64::from(secs))),
            }));
        }
        if self.forbidden.lock().unwrap().contains(&what) {
            let message = format!(
                "{resource}.{group} {} is forbidden: User \"system:serviceaccount:{ns}:shoal\" cannot {verb} resource \"{resource}\" in API group \"{group}\" in the namespace \"{ns}\"",
                name.as_deref()
                    .map(|n| format!("\"{n}\""))
                    .unwrap_or_default()
            );
            return Ok(full(
                StatusCode::FORBIDDEN,
                status_json(403, "Forbidden", &message),
            ));
        }
        let selector = parse_selector(&query(&req, "labelSelector").unwrap_or_default());
        let rv = query(&req, "resourceVersion").unwrap_or_default();
        if verb == "list" && !rv.is_empty() {
            // Only "not older than" is served here (what the provider asks for): an exact
            // match would be a read from etcd at that revision.
            let matching = query(&req, "resourceVersionMatch").unwrap_or_default();
            if matching != "NotOlderThan" {
                return Ok(full(
                    StatusCode::BAD_REQUEST,
                    status_json(
                        400,
                        "BadRequest",
                        &format!("resourceVersionMatch {matching:?}"),
                    ),
                ));
            }
        }
        let list_options = ListOptions {
            resource_version: rv.clone(),
            limit: query(&req, "limit").and_then(|l| l.parse().ok()),
            continue_token: query(&req, "continue").filter(|c| !c.is_empty()),
        };
        if list_options.continue_token.is_some() && !rv.is_empty() {
            // As the real server: the token carries the list's version.
            return Ok(full(
                StatusCode::BAD_REQUEST,
                status_json(
                    400,
                    "BadRequest",
                    "specifying resource version is not allowed when using continue",
                ),
            ));
        }
        self.lists.lock().unwrap().extend((verb == "list").then(|| {
            match &list_options.continue_token {
                Some(token) => format!("{resource} continue {token}"),
                None => format!("{resource}@{rv}"),
            }
        }));
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if verb == "watch"
            && let Some(odd) = self.odd_watch(&what)
        {
            let events: Vec<Result<WatchEvent<Lease>, ApiError>> = match odd {
                OddWatch::EndsAtOnce => vec![],
                OddWatch::Gone => vec![Err(ApiError::Gone(
                    "too old resource version: 1 (20)".into(),
                ))],
            };
            // The event's kind does not matter to an empty stream or an ERROR.
            return Ok(watch_body(
                futures::stream::iter(events).boxed(),
                "Lease",
                "coordination.k8s.io/v1",
                encode_lease,
            ));
        }
        let s = &self.server;
        let answer = match (resource.as_str(), verb) {
            ("leases", "list") => s.list_leases(&ns, &selector, &list_options).await.map(|l| {
                full(
                    StatusCode::OK,
                    json!({
                        "apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                        "metadata": {"resourceVersion": l.resource_version, "continue": l.continue_token.unwrap_or_default()},
                        "items": l.items.iter().map(encode_lease).collect::<Vec<_>>()
                    }),
                )
            }),
            ("leases", "watch") => s
                .watch_leases(&ns, &selector, &rv)
                .await
                .map(|w| {
                    watch_body(
                        self.cuttable(w),
                        "Lease",
                        "coordination.k8s.io/v1",
                        encode_lease,
                    )
                }),
            ("leases", "get") => match s.get_lease(&ns, name.as_deref().unwrap()).await {
                Ok(Some(l)) => Ok(full(StatusCode::OK, encode_lease(&l))),
                Ok(None) => Err(ApiError::NotFound(format!(
                    "leases \"{}\" not found",
                    name.unwrap()
                ))),
                Err(e) => Err(e),
            },
            ("leases", "create" | "update") => {
                let lease: coordination::Lease = match serde_json::from_slice(&body) {
                    Ok(l) => l,
                    Err(e) => {
                        return Ok(full(
                            StatusCode::BAD_REQUEST,
                            status_json(400, "BadRequest", &e.to_string()),
                        ));
                    }
                };
                let mut lease = lease_from_k8s(lease);
                lease.meta.namespace = ns.clone();
                let written = if verb == "create" {
                    s.create_lease(lease).await
                } else {
                    s.replace_lease(lease).await
                };
                written.map(|l| full(StatusCode::OK, encode_lease(&l)))
            }
            ("leases", "delete") => {
                let options: serde_json::Value = serde_json::from_slice(&body).unwrap_or(json!({}));
                let pre = options["preconditions"]["resourceVersion"]
                    .as_str()
                    .map(String::from);
                s.delete_lease(&ns, name.as_deref().unwrap(), pre.as_deref())
                    .await
                    .map(|()| full(StatusCode::OK, json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})))
            }
            ("endpointslices", "list") => {
                let service = selector
                    .get(shoal::kubernetes::api::SERVICE_NAME_LABEL)
                    .cloned()
                    .unwrap_or_default();
                s.list_endpoint_slices(&ns, &service, &list_options).await.map(|l| {
                    full(
                        StatusCode::OK,
                        json!({
                            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                            "metadata": {"resourceVersion": l.resource_version, "continue": l.continue_token.unwrap_or_default()},
                            "items": l.items.iter().map(encode_slice).collect::<Vec<_>>()
                        }),
                    )
                })
            }
            ("endpointslices", "watch") => {
                let service = selector
                    .get(shoal::kubernetes::api::SERVICE_NAME_LABEL)
                    .cloned()
                    .unwrap_or_default();
                s.watch_endpoint_slices(&ns, &service, &rv)
                    .await
                    .map(|w| {
                        watch_body(
                            self.cuttable(w),
                            "EndpointSlice",
                            "discovery.k8s.io/v1",
                            encode_slice,
                        )
                    })
            }
            _ => Err(ApiError::NotFound(format!("{verb} {resource}"))),
        };
        Ok(answer.unwrap_or_else(|e| failure(&e)))
    }

    /// Serves on a free loopback port; returns its URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let double = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let double = double.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| double.clone().handle(req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        url
    }
}

async fn api_at(url: &str) -> KubeRsApi {
    KubeRsApi::from_config(kube::Config::new(url.parse().unwrap())).unwrap()
}

fn lease(name: &str, cluster: &str) -> Lease {
    Lease {
        meta: ObjectMeta {
            name: name.into(),
            namespace: "ns".into(),
            labels: [(CLUSTER_LABEL.to_string(), cluster.to_string())].into(),
            ..ObjectMeta::default()
        },
        holder_identity: Some(name.into()),
        lease_duration_seconds: Some(10),
        renew_time_micros: Some(1_700_000_000_123_456),
        ..Lease::default()
    }
}

#[tokio::test]
async fn conflicts_gone_bookmarks_and_selection_cross_the_wire() {
    let double = Double::default();
    let api = api_at(&double.serve().await).await;
    let created = api.create_lease(lease("a", "c")).await.unwrap();
    assert!(!created.meta.resource_version.is_empty());
    assert_eq!(
        created.renew_time_micros,
        Some(1_700_000_000_123_456),
        "MicroTime keeps microseconds"
    );
    assert!(matches!(
        api.create_lease(lease("a", "c")).await,
        Err(ApiError::AlreadyExists(_))
    ));
    // A write based on an old version is a conflict; one on the current version succeeds.
    let mut stale = created.clone();
    stale.meta.resource_version = "1".into();
    let mut renewed = created.clone();
    renewed.renew_time_micros = Some(1_700_000_001_000_000);
    let renewed = api.replace_lease(renewed).await.unwrap();
    stale.renew_time_micros = Some(5);
    assert!(matches!(
        api.replace_lease(stale).await,
        Err(ApiError::Conflict(_))
    ));
    assert!(matches!(
        api.delete_lease("ns", "a", Some(&created.meta.resource_version))
            .await,
        Err(ApiError::Conflict(_))
    ));
    assert_eq!(api.get_lease("ns", "nope").await.unwrap(), None);
    // The server selects by label.
    api.create_lease(lease("b", "other")).await.unwrap();
    let sel = [(CLUSTER_LABEL.to_string(), "c".to_string())].into();
    let list = api
        .list_leases("ns", &sel, &ListOptions::default())
        .await
        .unwrap();
    // A list not older than a version is served with the newest state; one the server has not
    // reached yet is refused (the real one answers 504 after waiting), never answered old.
    let not_older_than = |rv: &str| ListOptions {
        resource_version: rv.to_string(),
        ..ListOptions::default()
    };
    let cached = api
        .list_leases("ns", &sel, &not_older_than(&list.resource_version))
        .await
        .unwrap();
    assert_eq!(cached, list);
    let too_new = api
        .list_leases("ns", &sel, &not_older_than("999999"))
        .await
        .expect_err("a version not reached yet");
    assert!(matches!(too_new, ApiError::Unavailable(_)), "{too_new:?}");
    assert_eq!(
        double.lists.lock().unwrap()[..3],
        [
            "leases@".to_string(),
            format!("leases@{}", list.resource_version),
            "leases@999999".to_string()
        ],
        "the resource version crosses the wire with resourceVersionMatch=NotOlderThan"
    );
    assert_eq!(
        list.items
            .iter()
            .map(|l| l.meta.name.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    // A watch from the list sees later changes of its selection, and bookmarks.
    let mut watch = api
        .watch_leases("ns", &sel, &list.resource_version)
        .await
        .unwrap();
    api.create_lease(lease("c", "other")).await.unwrap();
    api.delete_lease("ns", "a", Some(&renewed.meta.resource_version))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    assert!(
        matches!(next, Some(Ok(WatchEvent::Deleted(ref l))) if l.meta.name == "a"),
        "{next:?}"
    );
    double.server.bookmark();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    assert!(
        matches!(next, Some(Ok(WatchEvent::Bookmark(ref rv))) if *rv == double.server.resource_version()),
        "{next:?}"
    );
    // A watch from a compacted version: 410 Gone, as the provider needs to relist.
    double.server.compact();
    let gone = match api.watch_leases("ns", &sel, &list.resource_version).await {
        Err(e) => e,
        Ok(mut w) => tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .expect("an event")
            .expect_err("a 410"),
    };
    assert!(matches!(gone, ApiError::Gone(_)), "{gone:?}");
}

fn provider_config() -> KubernetesProviderConfig {
    let mut c = KubernetesProviderConfig::new("ns");
    c.lease_duration = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(2);
    c.startup_timeout = Duration::from_secs(10);
    // Every list in pages of one Lease: paging crosses the wire in every test.
    c.list_page_size = Some(1);
    c
}

/// A member with the default settings (sharded heartbeats: a record and a heartbeat Lease
/// each).
async fn start(
    url: &str,
    port: u16,
) -> Result<(KubernetesProvider, ClusterProviderContext), ProviderError> {
    start_with(url, port, provider_config()).await
}

/// A member that renews one Lease watched by everyone (one Lease watch: the tests of the
/// reflector's watch mechanics count its watches and lists).
async fn start_everyone(
    url: &str,
    port: u16,
) -> Result<(KubernetesProvider, ClusterProviderContext), ProviderError> {
    let mut config = provider_config();
    config.heartbeats = Heartbeats::Everyone;
    start_with(url, port, config).await
}

async fn start_with(
    url: &str,
    port: u16,
    config: KubernetesProviderConfig,
) -> Result<(KubernetesProvider, ClusterProviderContext), ProviderError> {
    let provider = KubernetesProvider::new(config, Arc::new(api_at(url).await));
    let ctx = ClusterProviderContext::new(
        "c",
        format!("127.0.0.1:{port}"),
        ["user"],
        TokioClock::shared(),
    )
    .unwrap();
    provider.start_member(ctx.clone()).await?;
    Ok((provider, ctx))
}

#[tokio::test]
async fn members_over_kube_rs_see_each_other_and_drop_a_crashed_one() {
    let double = Double::default();
    let url = double.serve().await;
    let (a, a_ctx) = start(&url, 4001).await.unwrap();
    let (b, b_ctx) = start(&url, 4002).await.unwrap();
    let (c, _) = start(&url, 4003).await.unwrap();
    common::wait_until("three members everywhere", 10, || {
        a_ctx.partition_manager.topology().len() == 3
            && b_ctx.partition_manager.topology().len() == 3
    })
    .await;
    // c listed the two Leases before its own in pages of one (`limit=1`, then `continue`).
    let lists = double.lists.lock().unwrap().clone();
    assert!(
        lists.iter().any(|l| l.starts_with("leases continue ")),
        "{lists:?}"
    );
    // c stops without deleting its Lease (a crash): a peer deletes it once expired.
    c.shutdown(false).await.unwrap();
    common::wait_until("the crashed member dropped", 15, || {
        a_ctx.partition_manager.topology().len() == 2
            && b_ctx.partition_manager.topology().len() == 2
    })
    .await;
    // Sharded heartbeats (the default): a record and a heartbeat Lease per member.
    assert_eq!(double.server.leases().len(), 4);
    // b leaves gracefully: its Lease is deleted.
    b.shutdown(true).await.unwrap();
    common::wait_until("the leaver dropped", 10, || {
        a_ctx.partition_manager.topology().len() == 1
    })
    .await;
    assert_eq!(double.server.leases().len(), 2);
    a.shutdown(true).await.unwrap();
    assert!(double.server.leases().is_empty());
}

#[tokio::test]
async fn refusals_name_the_resource_and_the_verb() {
    let double = Double::default();
    let url = double.serve().await;
    double.forbid("create leases");
    let err = start(&url, 4001).await.expect_err("start must fail");
    let text = err.to_string();
    assert!(matches!(err, ProviderError::Rejected(_)), "{text}");
    assert!(
        text.contains("create Lease ns/") && text.contains("forbidden"),
        "{text}"
    );
    let double = Double::default();
    let url = double.serve().await;
    double.forbid("list leases");
    let err = start(&url, 4001).await.expect_err("start must fail");
    let text = err.to_string();
    assert!(matches!(err, ProviderError::Rejected(_)), "{text}");
    assert!(
        text.contains("list Leases in ns") && text.contains("forbidden"),
        "{text}"
    );
    // The refused start left nothing behind.
    assert!(double.server.leases().is_empty());
}

/// API Priority and Fairness sheds a member's lists and a renewal with 429: each is sent again
/// no sooner than its `Retry-After` (the double timestamps arrivals: by causality the next
/// request cannot arrive before the wait if the client honoured it), the member still starts,
/// and the metric counts them.
#[tokio::test]
async fn requests_shed_with_429_are_retried_no_sooner_than_retry_after() {
    let double = Double::default();
    let url = double.serve().await;
    double.throttle("list leases", 2, 1);
    let mut config = provider_config();
    config.lease_duration = Duration::from_secs(6);
    let provider = KubernetesProvider::new(config, Arc::new(api_at(&url).await));
    let ctx =
        ClusterProviderContext::new("c", "127.0.0.1:4001", ["user"], TokioClock::shared()).unwrap();
    provider.start_member(ctx.clone()).await.unwrap();
    let waits = double.waits_after_shedding("list leases");
    assert_eq!(waits.len(), 2, "two shed lists, each followed by another");
    for gap in waits {
        assert!(
            gap >= Duration::from_secs(1),
            "a shed list was sent again after {gap:?}"
        );
    }
    // A shed renewal waits for Retry-After too, and the member stays listed.
    double.throttle("update leases", 1, 3);
    common::wait_until("a renewal after the shed one", 15, || {
        !double.waits_after_shedding("update leases").is_empty()
    })
    .await;
    let gap = double.waits_after_shedding("update leases")[0];
    assert!(
        gap >= Duration::from_secs(3),
        "a shed renewal was sent again after {gap:?}"
    );
    assert_eq!(provider.metrics().throttled.get(), 3);
    common::wait_until("still a member", 10, || {
        ctx.partition_manager.topology().len() == 1
    })
    .await;
    provider.shutdown(true).await.unwrap();
}

/// A cluster name or metadata key Kubernetes would refuse (422 on the first write) is refused
/// before any request, naming what is wrong; the member's description stays as it was.
#[tokio::test]
async fn names_kubernetes_would_refuse_are_refused_before_any_request() {
    let double = Double::default();
    let url = double.serve().await;
    let provider = KubernetesProvider::new(provider_config(), Arc::new(api_at(&url).await));
    let ctx =
        ClusterProviderContext::new("Shop_EU", "127.0.0.1:4001", ["user"], TokioClock::shared())
            .unwrap();
    let err = provider
        .start_member(ctx)
        .await
        .expect_err("an invalid cluster name");
    assert!(matches!(err, ProviderError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("\"Shop_EU\""), "{err}");
    assert!(
        double.requests.lock().unwrap().is_empty(),
        "no request was sent"
    );

    let (a, a_ctx) = start(&url, 4001).await.unwrap();
    let mut description = a_ctx.member.description();
    description.metadata.insert("build id".into(), "7".into());
    let err = a
        .update_member(description)
        .await
        .expect_err("an invalid metadata key");
    assert!(matches!(err, ProviderError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("\"build id\""), "{err}");
    let leases = double.server.leases();
    let lease = leases.values().next().unwrap();
    assert!(
        lease.meta.annotations.keys().all(|k| !k.contains("build")),
        "{lease:?}"
    );
    a.shutdown(true).await.unwrap();
}

/// A kubeconfig pointing at the double (plain HTTP, no credentials), written to a fresh file.
fn kubeconfig(url: &str, name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("shoal-kube-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    common::process::write(
        &dir,
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {url}\n\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: nobody\n\
             current-context: double\nusers:\n- name: nobody\n  user: {{}}\n"
        ),
    )
}

/// `shoal member --kubernetes` and `shoal topology --kubernetes` as real processes, kube-rs
/// reading a kubeconfig, against the double: two members see each other, `topology` lists
/// them, a `kill -9`ed member's Lease is deleted by its peer, SIGTERM deletes the survivor's
/// Lease, and a bad namespace or a missing one is an error naming it.
#[test]
fn the_cli_joins_lists_and_leaves_through_the_kubernetes_api() {
    use common::process::{Proc, free_port, shoal_bin};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let double = Double::default();
    let url = rt.block_on(double.serve());
    let config = kubeconfig(&url, "cli");
    let env = [("KUBECONFIG", config.as_str())];
    let member = |name: &str| {
        let advertise = format!("127.0.0.1:{}", free_port());
        Proc::spawn_with(
            name,
            shoal_bin(),
            &[
                "member",
                "--kubernetes",
                "--namespace",
                "ns",
                "--cluster",
                "c",
                "--advertise",
                &advertise,
                "--kinds",
                "user",
                "--lease-duration",
                "2s",
            ],
            &env,
        )
    };
    let count = |v: &serde_json::Value| v["members"].as_array().map_or(0, Vec::len);
    let a = member("a");
    let mut b = member("b");
    a.wait_snapshot("2 members", 20, |v| count(v) == 2);
    b.wait_snapshot("2 members", 20, |v| count(v) == 2);
    // Sharded heartbeats (the default): a record and a heartbeat Lease per member.
    assert_eq!(double.server.leases().len(), 4);

    let topology = |extra: &[&str]| {
        std::process::Command::new(shoal_bin())
            .args(["topology", "--kubernetes", "--cluster", "c"])
            .args(extra)
            .env("KUBECONFIG", &config)
            .env_remove("POD_NAMESPACE")
            .output()
            .unwrap()
    };
    let out = topology(&["--namespace", "ns", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(count(&listed), 2, "{listed}");
    assert_eq!(listed["members"][0]["kinds"], json!(["user"]), "{listed}");

    // b dies without deleting its Lease: a deletes it once expired (2 s Lease).
    b.kill9();
    a.wait_snapshot("b removed", 20, |v| count(v) == 1);
    assert_eq!(double.server.leases().len(), 2);

    // A graceful stop deletes the Lease.
    let mut a = a;
    assert!(a.sigterm().success());
    assert!(double.server.leases().is_empty());

    // Errors name what is wrong.
    let no_ns = topology(&[]);
    assert!(!no_ns.status.success());
    assert!(
        String::from_utf8_lossy(&no_ns.stderr).contains("--namespace"),
        "{}",
        String::from_utf8_lossy(&no_ns.stderr)
    );
    double.forbid("list leases");
    let forbidden = topology(&["--namespace", "ns", "--wait", "3s"]);
    let err = String::from_utf8_lossy(&forbidden.stderr);
    assert!(!forbidden.status.success());
    assert!(
        err.contains("list Leases in ns") && err.contains("forbidden"),
        "{err}"
    );
}

/// `a` (the only member) sees a member that starts now, then both leave.
async fn follows_a_new_member_then_leaves(
    url: &str,
    a: KubernetesProvider,
    a_ctx: &ClusterProviderContext,
) {
    let (b, _) = start(url, 4002).await.unwrap();
    common::wait_until("the new member seen", 10, || {
        a_ctx.partition_manager.topology().len() == 2
    })
    .await;
    b.shutdown(true).await.unwrap();
    a.shutdown(true).await.unwrap();
}

/// A watch that ends at once with no event (a server or a proxy closing watches) is opened
/// again with growing backoff, not in a loop (client-go's "very short watch"); once watches
/// are served again the member follows the cluster.
#[tokio::test]
async fn a_watch_that_ends_at_once_is_reopened_with_backoff_not_in_a_loop() {
    let double = Double::default();
    let url = double.serve().await;
    let (a, a_ctx) = start_everyone(&url, 4001).await.unwrap();
    double.odd_watches("watch leases", OddWatch::EndsAtOnce, u32::MAX);
    let before = double.arrivals("watch leases").len();
    double.cut_watches();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let reopened: Vec<std::time::Instant> = double.arrivals("watch leases")[before..]
        .iter()
        .map(|(at, _)| *at)
        .collect();
    // Backoff from 100 ms, doubling, with equal jitter, capped at the renew interval (2 s / 3):
    // about eight watches in 4 s. Reopened at once, it would be thousands over loopback.
    assert!(
        (3..=16).contains(&reopened.len()),
        "{} watches in 4 s",
        reopened.len()
    );
    let gaps: Vec<Duration> = reopened.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter()
            .skip(2)
            .all(|g| *g >= Duration::from_millis(150)),
        "the waits between watches did not grow: {gaps:?}"
    );
    assert!(a.metrics().watch_reopens.get() >= 3);
    // Served again: the watch resumes and shows a new member.
    double.odd_watches("watch leases", OddWatch::EndsAtOnce, 0);
    follows_a_new_member_then_leaves(&url, a, &a_ctx).await;
}

/// A watch answered `410 Gone` (its version left the watch cache) is followed by a list not
/// older than the last version the member saw (`resourceVersion` with
/// `resourceVersionMatch=NotOlderThan`, served from the watch cache), not by a quorum read
/// (empty `resourceVersion`, a read of etcd by every member at once).
#[tokio::test]
async fn a_watch_whose_version_is_gone_relists_not_older_than_the_last_version_seen() {
    let double = Double::default();
    let url = double.serve().await;
    let (a, a_ctx) = start_everyone(&url, 4001).await.unwrap();
    let lists_before = double.lists.lock().unwrap().len();
    double.odd_watches("watch leases", OddWatch::Gone, 1);
    double.cut_watches();
    common::wait_until("a relist", 10, || {
        a.metrics().relists.get() >= 1 && double.lists.lock().unwrap().len() > lists_before
    })
    .await;
    let lists = double.lists.lock().unwrap()[lists_before..].to_vec();
    let first = &lists[0];
    assert!(
        first.starts_with("leases@") && first.len() > "leases@".len(),
        "the relist after 410 was {first:?} (all: {lists:?})"
    );
    assert!(
        !lists.iter().any(|l| l == "leases@"),
        "a quorum list after 410: {lists:?}"
    );
    // And the member follows the cluster afterwards.
    follows_a_new_member_then_leaves(&url, a, &a_ctx).await;
}

/// An object relabelled out of a watch's selector reaches that watch as DELETED, and back in as
/// ADDED (the real server's rule: a watcher sees its selection change, not the object's
/// history), across the wire and kube-rs's decoding.
#[tokio::test]
async fn an_object_leaving_and_entering_the_selection_is_deleted_and_added() {
    let double = Double::default();
    let api = api_at(&double.serve().await).await;
    let sel = [(CLUSTER_LABEL.to_string(), "c".to_string())].into();
    let created = api.create_lease(lease("a", "c")).await.unwrap();
    let mut watch = api
        .watch_leases("ns", &sel, &created.meta.resource_version)
        .await
        .unwrap();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("an event within 5 s")
    };
    let mut moved = created.clone();
    moved
        .meta
        .labels
        .insert(CLUSTER_LABEL.to_string(), "other".to_string());
    let moved = api.replace_lease(moved).await.unwrap();
    let event = next().await;
    assert!(
        matches!(event, Some(Ok(WatchEvent::Deleted(ref l))) if l.meta.name == "a"),
        "relabelled out: {event:?}"
    );
    // A change outside the selection is not shown; coming back in is an ADDED.
    let mut renewed = moved.clone();
    renewed.renew_time_micros = Some(1_700_000_002_000_000);
    let renewed = api.replace_lease(renewed).await.unwrap();
    let mut back = renewed.clone();
    back.meta
        .labels
        .insert(CLUSTER_LABEL.to_string(), "c".to_string());
    api.replace_lease(back).await.unwrap();
    let event = next().await;
    assert!(
        matches!(event, Some(Ok(WatchEvent::Added(ref l)))
            if l.meta.name == "a" && l.renew_time_micros == Some(1_700_000_002_000_000)),
        "relabelled back in: {event:?}"
    );
}
