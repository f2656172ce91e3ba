//! An in-memory Kubernetes API server for Leases and EndpointSlices, with the semantics the
//! provider depends on:
//!
//! * one resource version counter for every object (like etcd's revision), set on every write
//!   and carried by every watch event;
//! * `create` of a taken name is `409 AlreadyExists`; `replace` and `delete` with a resource
//!   version that is no longer current are `409 Conflict`;
//! * a list returns its resource version; a watch from it sees every later change, in order;
//! * the event history is compacted (bounded, or on demand): a watch from a compacted version
//!   is `410 Gone`, and so is a watcher that falls too far behind a live watch;
//! * bookmarks ([`MemoryApiServer::bookmark`]) tell watchers the current version;
//! * a watch from `""` or `"0"` ("any version") starts with the current objects as synthetic
//!   ADDED events;
//! * an event is sent only to the watches whose label selector it matches; a change of labels
//!   that takes an object out of a watch's selection reaches that watch as DELETED (with the
//!   object as it was, at the change's version), one that brings it in as ADDED (the real
//!   watch cache's rule: a watcher sees its selection change, not the object's history).
//!
//! Not modelled: field selectors, pagination, server-side apply, finalizers and garbage
//! collection, admission, RBAC. Writes of EndpointSlices (the endpoints controller's job) go
//! through [`MemoryApiServer::put_endpoint_slice`] and [`MemoryApiServer::delete_endpoint_slice`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::api::{
    ApiError, EndpointSlice, KubeApi, LabelSelector, Lease, ListOptions, Object, ObjectList,
    SERVICE_NAME_LABEL, WatchEvent, WatchStream, selects,
};

/// Events kept for watches to resume from, per kind, unless compacted earlier.
pub const DEFAULT_HISTORY: usize = 1_000;

/// Live events buffered per watcher; one further behind is closed with `410 Gone`.
const WATCH_BUFFER: usize = 256;

/// The shared state of one in-memory API server. Clone it to share.
#[derive(Clone, Debug)]
pub struct MemoryApiServer {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    /// The newest resource version issued.
    version: u64,
    /// Events at or below this version are gone from the history.
    compacted: u64,
    /// The store's own compaction ([`MemoryApiServer::compact`], etcd's): a continuation of a
    /// list older than this is gone. The watch history's trimming does not touch it (on a
    /// real cluster a continue token lives until etcd compacts, about 5 minutes).
    store_compacted: u64,
    history_limit: usize,
    leases: Kind<Lease>,
    slices: Kind<EndpointSlice>,
}

/// One open watch: where its events go, and whether it fell behind (its stream then ends
/// with `410 Gone`).
#[derive(Debug)]
struct Watcher<T> {
    tx: mpsc::Sender<(u64, WatchEvent<T>)>,
    lagged: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug)]
struct Kind<T> {
    objects: BTreeMap<(String, String), T>,
    history: VecDeque<(u64, Change<T>)>,
    /// Open watches grouped by (namespace, selector): an event is matched once per group, and
    /// only the watches it selects are woken (the real cacher filters per watcher; here the
    /// cost of a heartbeat event does not grow with the watchers of other selections).
    watchers: BTreeMap<(String, LabelSelector), Vec<Watcher<T>>>,
}

/// One write as the history keeps it: the event, and for a change of labels the object as it
/// was (so each watch is shown the change of its own selection).
#[derive(Debug)]
struct Change<T> {
    event: WatchEvent<T>,
    /// The object before a MODIFIED whose labels changed.
    before: Option<T>,
}

impl<T: Object> Change<T> {
    /// A bookmark at `rv`.
    fn bookmark(rv: String) -> Self {
        Self {
            event: WatchEvent::Bookmark(rv),
            before: None,
        }
    }

    /// The event a watch of `selector` sees, if any (namespaces are matched by the caller).
    fn as_seen_by(&self, selector: &LabelSelector) -> Option<WatchEvent<T>> {
        let selected = |o: &T| selects(selector, &o.meta().labels);
        match (&self.event, &self.before) {
            (WatchEvent::Bookmark(_), _) => Some(self.event.clone()),
            (WatchEvent::Modified(now), Some(before)) => match (selected(before), selected(now)) {
                (true, true) => Some(self.event.clone()),
                (false, true) => Some(WatchEvent::Added(now.clone())),
                (true, false) => {
                    let mut was = before.clone();
                    was.meta_mut()
                        .resource_version
                        .clone_from(&now.meta().resource_version);
                    Some(WatchEvent::Deleted(was))
                }
                (false, false) => None,
            },
            (WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o), _) => {
                selected(o).then(|| self.event.clone())
            }
        }
    }
}

impl<T: Object> Kind<T> {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            watchers: BTreeMap::new(),
        }
    }

    /// Sends `change` to every watcher it selects, as that watcher's selection sees it (a
    /// bookmark: to every watcher); a watcher whose buffer is full is ended with `410 Gone`,
    /// one whose stream is gone is dropped.
    fn dispatch(&mut self, version: u64, change: &Change<T>) {
        let namespace = namespace_of(&change.event);
        for ((ns, selector), group) in self.watchers.iter_mut() {
            if namespace.is_some_and(|n| n != ns) {
                continue;
            }
            // Most writes change no labels: their event goes out as it is, uncopied.
            let seen;
            let event = match (&change.before, &change.event) {
                (None, WatchEvent::Bookmark(_)) => &change.event,
                (None, WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o)) => {
                    if !selects(selector, &o.meta().labels) {
                        continue;
                    }
                    &change.event
                }
                (Some(_), _) => match change.as_seen_by(selector) {
                    Some(e) => {
                        seen = e;
                        &seen
                    }
                    None => continue,
                },
            };
            group.retain(|w| match w.tx.try_send((version, event.clone())) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    w.lagged.store(true, std::sync::atomic::Ordering::SeqCst);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
        self.watchers.retain(|_, group| !group.is_empty());
    }

    /// One page of the objects of `namespace` matching `selector`, as of `version`: after
    /// the name `after` (a continuation), at most `limit` of them, in name order.
    ///
    /// A continuation page shows the remaining objects as they are now, not as of the first
    /// page's version (no MVCC here); a client that watches from the list's version is
    /// replayed every change after it, so its cache converges all the same.
    fn list(
        &self,
        version: u64,
        namespace: &str,
        selector: &LabelSelector,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> ObjectList<T> {
        let mut matching = self
            .objects
            .iter()
            .filter(|((ns, name), o)| {
                ns == namespace
                    && after.is_none_or(|a| name.as_str() > a)
                    && selects(selector, &o.meta().labels)
            })
            .map(|(_, o)| o);
        let limit = limit.filter(|l| *l > 0).map_or(usize::MAX, |l| l as usize);
        let items: Vec<T> = matching.by_ref().take(limit).cloned().collect();
        let continue_token = match (matching.next(), items.last()) {
            (Some(_), Some(last)) => Some(format!("{version}/{}", last.meta().name)),
            _ => None,
        };
        ObjectList {
            items,
            resource_version: version.to_string(),
            continue_token,
        }
    }

    /// Keeps a write in the history and sends it to the watches; `before`: the object as it
    /// was, for a MODIFIED.
    fn record(&mut self, version: u64, event: WatchEvent<T>, before: Option<&T>) {
        let changed_labels = |b: &&T| match &event {
            WatchEvent::Modified(now) => b.meta().labels != now.meta().labels,
            _ => false,
        };
        let change = Change {
            before: before.filter(changed_labels).cloned(),
            event,
        };
        self.dispatch(version, &change);
        self.history.push_back((version, change));
    }
}

fn key(meta: &super::api::ObjectMeta) -> (String, String) {
    (meta.namespace.clone(), meta.name.clone())
}

impl Default for MemoryApiServer {
    fn default() -> Self {
        Self::new(DEFAULT_HISTORY)
    }
}

impl MemoryApiServer {
    /// An empty server keeping the last `history_limit` events of each kind for watches.
    pub fn new(history_limit: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                version: 0,
                compacted: 0,
                store_compacted: 0,
                history_limit: history_limit.max(1),
                leases: Kind::new(),
                slices: Kind::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation completes before anything can panic, so a poisoned lock is consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest resource version issued.
    pub fn resource_version(&self) -> String {
        self.lock().version.to_string()
    }

    /// Forgets every event up to the current version: a watch from any older version is
    /// `410 Gone` (what etcd compaction does to a watcher that was away).
    pub fn compact(&self) {
        let mut s = self.lock();
        s.compacted = s.version;
        s.store_compacted = s.version;
        s.leases.history.clear();
        s.slices.history.clear();
    }

    /// Sends every watcher a bookmark with the current version.
    pub fn bookmark(&self) {
        let mut s = self.lock();
        let version = s.version;
        let bookmark = version.to_string();
        s.leases
            .dispatch(version, &Change::bookmark(bookmark.clone()));
        s.slices.dispatch(version, &Change::bookmark(bookmark));
    }

    /// Creates or replaces an EndpointSlice (the endpoints controller's write).
    pub fn put_endpoint_slice(&self, mut slice: EndpointSlice) -> EndpointSlice {
        let mut s = self.lock();
        let version = s.bump();
        slice.meta.resource_version = version.to_string();
        let k = key(&slice.meta);
        let old = s.slices.objects.get(&k);
        // Only a change of labels needs the object as it was (the watches' selections).
        let before = old
            .filter(|old| old.meta.labels != slice.meta.labels)
            .cloned();
        let event = match old {
            Some(old) => {
                slice.meta.uid = old.meta.uid.clone();
                WatchEvent::Modified(slice.clone())
            }
            None => {
                slice.meta.uid = format!("uid-{version}");
                WatchEvent::Added(slice.clone())
            }
        };
        s.slices.objects.insert(k, slice.clone());
        s.slices.record(version, event, before.as_ref());
        s.trim();
        slice
    }

    /// Deletes an EndpointSlice; whether it existed.
    pub fn delete_endpoint_slice(&self, namespace: &str, name: &str) -> bool {
        let mut s = self.lock();
        let k = (namespace.to_string(), name.to_string());
        if !s.slices.objects.contains_key(&k) {
            return false;
        }
        let version = s.bump();
        let mut gone = s.slices.objects.remove(&k).expect("checked above");
        gone.meta.resource_version = version.to_string();
        s.slices.record(version, WatchEvent::Deleted(gone), None);
        s.trim();
        true
    }

    /// Every Lease, by (namespace, name) (for tests and oracles).
    pub fn leases(&self) -> BTreeMap<(String, String), Lease> {
        self.lock().leases.objects.clone()
    }
}

impl State {
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Compacts the oldest events beyond the history limit.
    fn trim(&mut self) {
        let limit = self.history_limit;
        for history in [
            &mut self.leases.history as &mut dyn HistoryLen,
            &mut self.slices.history,
        ] {
            while history.len() > limit {
                let v = history.pop_front_version();
                self.compacted = self.compacted.max(v);
            }
        }
    }
}

/// Compaction across kinds without naming their object types.
trait HistoryLen {
    fn len(&self) -> usize;
    fn pop_front_version(&mut self) -> u64;
}

impl<T> HistoryLen for VecDeque<(u64, Change<T>)> {
    fn len(&self) -> usize {
        VecDeque::len(self)
    }
    fn pop_front_version(&mut self) -> u64 {
        self.pop_front().map_or(0, |(v, _)| v)
    }
}

/// The selector of a Service's EndpointSlices.
fn service_selector(service: &str) -> LabelSelector {
    [(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()
}

/// Parses a resource version the server issued ("" and "0": from now).
/// Where a list page starts: the list's version and the name after which it goes on.
///
/// A first page "not older than" a version (empty: the newest state) is served with the
/// current state, which is never older; a version the server has not reached is refused as the
/// real one refuses it after waiting a few seconds (`504`, "Too large resource version"). A
/// continuation carries its list's version: compacted away, it is `410 Gone` (the real
/// server's "continue token is too old"), and the client lists again from the start.
fn page_start(state: &State, options: &ListOptions) -> Result<(u64, Option<String>), ApiError> {
    if let Some(token) = &options.continue_token {
        let (version, after) = token
            .split_once('/')
            .and_then(|(v, after)| Some((v.parse::<u64>().ok()?, after.to_string())))
            .ok_or_else(|| ApiError::Rejected(format!("malformed continue token {token:?}")))?;
        if version < state.store_compacted {
            return Err(ApiError::Gone(format!(
                "the provided continue parameter is too old (list at {version}, compacted to {})",
                state.store_compacted
            )));
        }
        return Ok((version, Some(after)));
    }
    if !options.resource_version.is_empty() {
        let wanted = parse_version(&options.resource_version)?;
        if wanted > state.version {
            return Err(ApiError::Unavailable(format!(
                "Too large resource version: {wanted}, current: {}",
                state.version
            )));
        }
    }
    Ok((state.version, None))
}

fn parse_version(rv: &str) -> Result<u64, ApiError> {
    if rv.is_empty() {
        return Ok(0);
    }
    rv.parse()
        .map_err(|_| ApiError::Rejected(format!("invalid resource version {rv:?}")))
}

/// The namespace an event belongs to (`None`: a bookmark, for everyone).
fn namespace_of<T: Object>(event: &WatchEvent<T>) -> Option<&str> {
    match event {
        WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
            Some(o.meta().namespace.as_str())
        }
        WatchEvent::Bookmark(_) => None,
    }
}

/// A watch of one kind: the history after `from`, then live events, filtered by namespace and
/// labels; a watcher that falls behind the live buffer gets `410 Gone` and the stream ends.
fn watch<T: Object>(
    kind: &mut Kind<T>,
    (version, compacted): (u64, u64),
    resource_version: &str,
    namespace: &str,
    selector: &LabelSelector,
) -> Result<WatchStream<T>, ApiError> {
    // `""` and `"0"`: "start at any version" (the API's semantics): the current state as
    // synthetic ADDED events, then every later change. (A list of an empty store answers
    // version 0: a watch from it must still see what was created in between.)
    let (from, synthetic) = match parse_version(resource_version)? {
        0 => (version, true),
        v => (v, false),
    };
    if from < compacted {
        return Err(ApiError::Gone(format!(
            "too old resource version: {from} (compacted to {compacted})"
        )));
    }
    let in_namespace = |event: &WatchEvent<T>| namespace_of(event).is_none_or(|ns| ns == namespace);
    let backlog: VecDeque<WatchEvent<T>> = if synthetic {
        kind.objects
            .values()
            .filter(|o| selects(selector, &o.meta().labels))
            .map(|o| WatchEvent::Added(o.clone()))
            .filter(in_namespace)
            .collect()
    } else {
        kind.history
            .iter()
            .filter(|(v, c)| *v > from && in_namespace(&c.event))
            .filter_map(|(_, c)| c.as_seen_by(selector))
            .collect()
    };
    // Subscribed under the same lock as the backlog was read: nothing falls in between.
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let lagged = Arc::new(std::sync::atomic::AtomicBool::new(false));
    kind.watchers
        .entry((namespace.to_string(), selector.clone()))
        .or_default()
        .push(Watcher {
            tx,
            lagged: lagged.clone(),
        });
    let state = Some((backlog, rx, from));
    Ok(Box::pin(futures::stream::unfold(state, move |state| {
        let lagged = lagged.clone();
        async move {
            let (mut backlog, mut rx, mut seen) = state?;
            if let Some(e) = backlog.pop_front() {
                return Some((Ok(e), Some((backlog, rx, seen))));
            }
            loop {
                match rx.recv().await {
                    // Only what this watch selects is sent to it.
                    Some((v, e)) if v > seen || matches!(e, WatchEvent::Bookmark(_)) => {
                        seen = seen.max(v);
                        return Some((Ok(e), Some((backlog, rx, seen))));
                    }
                    // Already in the backlog.
                    Some(_) => {}
                    None if lagged.load(std::sync::atomic::Ordering::SeqCst) => {
                        return Some((
                            Err(ApiError::Gone(format!(
                                "watcher fell behind after resource version {seen}"
                            ))),
                            None,
                        ));
                    }
                    None => return None,
                }
            }
        }
    })))
}

#[async_trait]
impl KubeApi for MemoryApiServer {
    async fn get_lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>, ApiError> {
        Ok(self
            .lock()
            .leases
            .objects
            .get(&(namespace.to_string(), name.to_string()))
            .cloned())
    }

    async fn create_lease(&self, mut lease: Lease) -> Result<Lease, ApiError> {
        let mut s = self.lock();
        let k = key(&lease.meta);
        if s.leases.objects.contains_key(&k) {
            return Err(ApiError::AlreadyExists(format!(
                "leases {:?} already exists",
                lease.meta.name
            )));
        }
        let version = s.bump();
        lease.meta.resource_version = version.to_string();
        lease.meta.uid = format!("uid-{version}");
        s.leases.objects.insert(k, lease.clone());
        s.leases
            .record(version, WatchEvent::Added(lease.clone()), None);
        s.trim();
        Ok(lease)
    }

    async fn replace_lease(&self, mut lease: Lease) -> Result<Lease, ApiError> {
        let mut s = self.lock();
        let k = key(&lease.meta);
        let Some(current) = s.leases.objects.get(&k) else {
            return Err(ApiError::NotFound(format!(
                "leases {:?} not found",
                lease.meta.name
            )));
        };
        if !lease.meta.resource_version.is_empty()
            && lease.meta.resource_version != current.meta.resource_version
        {
            return Err(ApiError::Conflict(format!(
                "the object has been modified: leases {:?} is at {}, not {}",
                lease.meta.name, current.meta.resource_version, lease.meta.resource_version
            )));
        }
        lease.meta.uid = current.meta.uid.clone();
        // Only a change of labels needs the Lease as it was (the watches' selections).
        let before = (current.meta.labels != lease.meta.labels).then(|| current.clone());
        let version = s.bump();
        lease.meta.resource_version = version.to_string();
        s.leases.objects.insert(k, lease.clone());
        s.leases.record(
            version,
            WatchEvent::Modified(lease.clone()),
            before.as_ref(),
        );
        s.trim();
        Ok(lease)
    }

    async fn delete_lease(
        &self,
        namespace: &str,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<(), ApiError> {
        let mut s = self.lock();
        let k = (namespace.to_string(), name.to_string());
        let Some(current) = s.leases.objects.get(&k) else {
            return Err(ApiError::NotFound(format!("leases {name:?} not found")));
        };
        if let Some(rv) = precondition
            && rv != current.meta.resource_version
        {
            return Err(ApiError::Conflict(format!(
                "precondition failed: leases {name:?} is at {}, not {rv}",
                current.meta.resource_version
            )));
        }
        let version = s.bump();
        let mut gone = s.leases.objects.remove(&k).expect("checked above");
        gone.meta.resource_version = version.to_string();
        s.leases.record(version, WatchEvent::Deleted(gone), None);
        s.trim();
        Ok(())
    }

    async fn list_leases(
        &self,
        namespace: &str,
        selector: &LabelSelector,
        options: &ListOptions,
    ) -> Result<ObjectList<Lease>, ApiError> {
        let s = self.lock();
        let (version, after) = page_start(&s, options)?;
        Ok(s.leases.list(
            version,
            namespace,
            selector,
            after.as_deref(),
            options.limit,
        ))
    }

    async fn watch_leases(
        &self,
        namespace: &str,
        selector: &LabelSelector,
        resource_version: &str,
    ) -> Result<WatchStream<Lease>, ApiError> {
        let mut s = self.lock();
        let at = (s.version, s.compacted);
        watch(&mut s.leases, at, resource_version, namespace, selector)
    }

    async fn list_endpoint_slices(
        &self,
        namespace: &str,
        service: &str,
        options: &ListOptions,
    ) -> Result<ObjectList<EndpointSlice>, ApiError> {
        let s = self.lock();
        let (version, after) = page_start(&s, options)?;
        Ok(s.slices.list(
            version,
            namespace,
            &service_selector(service),
            after.as_deref(),
            options.limit,
        ))
    }

    async fn watch_endpoint_slices(
        &self,
        namespace: &str,
        service: &str,
        resource_version: &str,
    ) -> Result<WatchStream<EndpointSlice>, ApiError> {
        let mut s = self.lock();
        let at = (s.version, s.compacted);
        watch(
            &mut s.slices,
            at,
            resource_version,
            namespace,
            &service_selector(service),
        )
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::kubernetes::api::ObjectMeta;
    use crate::kubernetes::watch::{Next, Reflector};

    fn lease(name: &str, cluster: &str) -> Lease {
        Lease {
            meta: ObjectMeta {
                name: name.into(),
                namespace: "ns".into(),
                labels: [("shoal.io/cluster".to_string(), cluster.to_string())].into(),
                ..ObjectMeta::default()
            },
            holder_identity: Some(name.into()),
            ..Lease::default()
        }
    }

    fn sel(cluster: &str) -> LabelSelector {
        [("shoal.io/cluster".to_string(), cluster.to_string())].into()
    }

    /// A relabelling is shown to each watch as the change of its own selection, live and when
    /// resumed from the history: DELETED (the object as it was, at the change's version) to
    /// the selection it left, ADDED to the one it entered, nothing to one it never was in.
    #[tokio::test]
    async fn a_relabelled_object_leaves_one_selection_and_enters_another() {
        let api = MemoryApiServer::default();
        let created = api.create_lease(lease("a", "c")).await.unwrap();
        let from = created.meta.resource_version.clone();
        let mut live_c = api.watch_leases("ns", &sel("c"), &from).await.unwrap();
        let mut live_d = api.watch_leases("ns", &sel("d"), &from).await.unwrap();
        let mut moved = created.clone();
        moved
            .meta
            .labels
            .insert("shoal.io/cluster".into(), "d".into());
        let moved = api.replace_lease(moved).await.unwrap();
        // A change within a selection is a MODIFIED to it only.
        let mut renewed = moved.clone();
        renewed.renew_time_micros = Some(7);
        api.replace_lease(renewed).await.unwrap();
        api.bookmark();
        for (name, live) in [("live", true), ("resumed", false)] {
            let (mut c, mut d) = if live {
                (
                    std::mem::replace(&mut live_c, Box::pin(futures::stream::empty())),
                    std::mem::replace(&mut live_d, Box::pin(futures::stream::empty())),
                )
            } else {
                (
                    api.watch_leases("ns", &sel("c"), &from).await.unwrap(),
                    api.watch_leases("ns", &sel("d"), &from).await.unwrap(),
                )
            };
            match c.next().await {
                Some(Ok(WatchEvent::Deleted(l))) => {
                    assert_eq!(l.meta.labels["shoal.io/cluster"], "c", "{name}: as it was");
                    assert_eq!(l.meta.resource_version, moved.meta.resource_version);
                }
                other => panic!("{name}: left c: {other:?}"),
            }
            if live {
                assert!(matches!(c.next().await, Some(Ok(WatchEvent::Bookmark(_)))));
            }
            assert!(
                matches!(d.next().await, Some(Ok(WatchEvent::Added(ref l))) if l.meta.resource_version == moved.meta.resource_version),
                "{name}: entered d"
            );
            assert!(
                matches!(d.next().await, Some(Ok(WatchEvent::Modified(ref l))) if l.renew_time_micros == Some(7)),
                "{name}: changed within d"
            );
        }
    }

    #[tokio::test]
    async fn lists_come_in_pages_whose_tokens_die_with_compaction() {
        let api = MemoryApiServer::default();
        for name in ["a", "b", "c", "d", "e"] {
            api.create_lease(lease(name, "c")).await.unwrap();
        }
        api.create_lease(lease("x", "other")).await.unwrap();
        let mut options = ListOptions {
            limit: Some(2),
            ..ListOptions::default()
        };
        let mut names = Vec::new();
        let mut versions = Vec::new();
        loop {
            let page = api.list_leases("ns", &sel("c"), &options).await.unwrap();
            assert!(page.items.len() <= 2);
            names.extend(page.items.iter().map(|l| l.meta.name.clone()));
            versions.push(page.resource_version.clone());
            match page.continue_token {
                Some(token) => options.continue_token = Some(token),
                None => break,
            }
        }
        assert_eq!(
            names,
            ["a", "b", "c", "d", "e"],
            "every object once, in order"
        );
        assert!(
            versions.iter().all(|v| *v == versions[0]),
            "one list version"
        );
        // A page boundary on the last object: no empty page follows.
        options = ListOptions {
            limit: Some(5),
            ..ListOptions::default()
        };
        let page = api.list_leases("ns", &sel("c"), &options).await.unwrap();
        assert_eq!((page.items.len(), page.continue_token), (5, None));
        // A continuation of a list from before a compaction is gone; a made-up one is refused.
        options.limit = Some(2);
        let first = api.list_leases("ns", &sel("c"), &options).await.unwrap();
        api.create_lease(lease("f", "c")).await.unwrap();
        api.compact();
        options.continue_token = first.continue_token;
        assert!(matches!(
            api.list_leases("ns", &sel("c"), &options).await,
            Err(ApiError::Gone(_))
        ));
        options.continue_token = Some("nonsense".into());
        assert!(matches!(
            api.list_leases("ns", &sel("c"), &options).await,
            Err(ApiError::Rejected(_))
        ));
        // A first page not older than a version the server has not reached is refused.
        let too_new = ListOptions {
            resource_version: "1000".into(),
            ..ListOptions::default()
        };
        assert!(matches!(
            api.list_leases("ns", &sel("c"), &too_new).await,
            Err(ApiError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn writes_carry_resource_versions_and_stale_ones_conflict() {
        let api = MemoryApiServer::default();
        let a = api.create_lease(lease("a", "c")).await.unwrap();
        assert_eq!(a.meta.resource_version, "1");
        assert!(matches!(
            api.create_lease(lease("a", "c")).await,
            Err(ApiError::AlreadyExists(_))
        ));
        let mut renewed = a.clone();
        renewed.renew_time_micros = Some(5);
        let renewed = api.replace_lease(renewed).await.unwrap();
        assert_eq!(renewed.meta.resource_version, "2");
        assert_eq!(renewed.meta.uid, a.meta.uid);
        // A writer still holding version 1 loses.
        let mut stale = a.clone();
        stale.holder_identity = Some("thief".into());
        assert!(matches!(
            api.replace_lease(stale).await,
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            api.delete_lease("ns", "a", Some("1")).await,
            Err(ApiError::Conflict(_))
        ));
        api.delete_lease("ns", "a", Some("2")).await.unwrap();
        assert!(matches!(
            api.delete_lease("ns", "a", None).await,
            Err(ApiError::NotFound(_))
        ));
        assert_eq!(api.get_lease("ns", "a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_watch_from_a_list_sees_every_later_change_of_its_selection_in_order() {
        let api = MemoryApiServer::default();
        api.create_lease(lease("a", "c")).await.unwrap();
        api.create_lease(lease("other", "d")).await.unwrap();
        let list = api
            .list_leases("ns", &sel("c"), &ListOptions::default())
            .await
            .unwrap();
        assert_eq!(list.items.len(), 1);
        api.create_lease(lease("b", "c")).await.unwrap();
        api.create_lease(lease("other2", "d")).await.unwrap();
        let mut w = api
            .watch_leases("ns", &sel("c"), &list.resource_version)
            .await
            .unwrap();
        api.delete_lease("ns", "a", None).await.unwrap();
        api.bookmark();
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(w.next().await.unwrap().unwrap());
        }
        assert!(matches!(&got[0], WatchEvent::Added(l) if l.meta.name == "b"));
        assert!(matches!(&got[1], WatchEvent::Deleted(l) if l.meta.name == "a"));
        assert_eq!(got[2], WatchEvent::Bookmark("5".into()));
    }

    #[tokio::test]
    async fn compaction_makes_old_versions_gone_and_a_reflector_relists() {
        let api = MemoryApiServer::new(2);
        api.create_lease(lease("a", "c")).await.unwrap();
        let mut r: Reflector<Lease> = Reflector::new();
        r.listed(
            api.list_leases("ns", &sel("c"), &ListOptions::default())
                .await
                .unwrap(),
        );
        assert_eq!(
            r.next(),
            Next::Watch {
                resource_version: "1".into()
            }
        );
        // Versions 2-4; two events are kept, so everything up to version 2 is compacted.
        for name in ["b", "x", "y"] {
            api.create_lease(lease(name, "c")).await.unwrap();
        }
        let err = api.watch_leases("ns", &sel("c"), "1").await.err().unwrap();
        assert!(matches!(err, ApiError::Gone(_)), "{err:?}");
        r.failed(&err);
        assert!(matches!(r.next(), Next::List { .. }));
        assert_eq!(r.objects().len(), 1, "kept until the relist answers");
        r.listed(
            api.list_leases("ns", &sel("c"), &ListOptions::default())
                .await
                .unwrap(),
        );
        assert_eq!(r.objects().len(), 4);
        // A watch from a version still kept works; after an explicit compaction it is gone.
        assert!(api.watch_leases("ns", &sel("c"), "3").await.is_ok());
        api.compact();
        assert!(matches!(
            api.watch_leases("ns", &sel("c"), "3").await.err().unwrap(),
            ApiError::Gone(_)
        ));
        let rv = api.resource_version();
        assert!(api.watch_leases("ns", &sel("c"), &rv).await.is_ok());
    }

    #[tokio::test]
    async fn a_watch_from_zero_starts_with_the_current_objects_and_sees_only_its_selection() {
        let api = MemoryApiServer::new(100);
        // A list of the empty store answers version 0; a Lease is created before the watch.
        let list = api
            .list_leases("ns", &sel("a"), &ListOptions::default())
            .await
            .unwrap();
        assert_eq!(list.resource_version, "0");
        api.create_lease(lease("a-1", "a")).await.unwrap();
        let mut from_zero = api
            .watch_leases("ns", &sel("a"), &list.resource_version)
            .await
            .unwrap();
        let mut other = api.watch_leases("ns", &sel("b"), "1").await.unwrap();
        match from_zero.next().await {
            Some(Ok(WatchEvent::Added(l))) => assert_eq!(l.meta.name, "a-1"),
            e => panic!("expected the synthetic ADDED, got {e:?}"),
        }
        api.create_lease(lease("a-2", "a")).await.unwrap();
        api.create_lease(lease("b-1", "b")).await.unwrap();
        match from_zero.next().await {
            Some(Ok(WatchEvent::Added(l))) => assert_eq!(l.meta.name, "a-2"),
            e => panic!("{e:?}"),
        }
        // The other selection's watch is sent only its own Lease (and bookmarks).
        match other.next().await {
            Some(Ok(WatchEvent::Added(l))) => assert_eq!(l.meta.name, "b-1"),
            e => panic!("{e:?}"),
        }
        api.bookmark();
        assert_eq!(
            other.next().await,
            Some(Ok(WatchEvent::Bookmark("3".into())))
        );
    }

    #[tokio::test]
    async fn endpoint_slices_are_selected_by_service() {
        let api = MemoryApiServer::default();
        let slice = |name: &str, service: &str| EndpointSlice {
            meta: ObjectMeta {
                name: name.into(),
                namespace: "ns".into(),
                labels: [(SERVICE_NAME_LABEL.to_string(), service.to_string())].into(),
                ..ObjectMeta::default()
            },
            endpoints: vec![],
        };
        api.put_endpoint_slice(slice("s1", "shop"));
        api.put_endpoint_slice(slice("s2", "other"));
        let list = api
            .list_endpoint_slices("ns", "shop", &ListOptions::default())
            .await
            .unwrap();
        assert_eq!(list.items.len(), 1);
        let mut w = api
            .watch_endpoint_slices("ns", "shop", &list.resource_version)
            .await
            .unwrap();
        api.put_endpoint_slice(slice("s2", "other"));
        api.put_endpoint_slice(slice("s1", "shop"));
        assert!(api.delete_endpoint_slice("ns", "s1"));
        assert!(
            matches!(w.next().await.unwrap().unwrap(), WatchEvent::Modified(s) if s.meta.name == "s1")
        );
        assert!(
            matches!(w.next().await.unwrap().unwrap(), WatchEvent::Deleted(s) if s.meta.name == "s1")
        );
    }
}
