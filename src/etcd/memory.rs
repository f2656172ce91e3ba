//! An etcd in memory, with the semantics the provider depends on, for tests and as the
//! simulator's etcd node.
//!
//! Modelled: one store revision raised by every write; leases with a TTL on the *server's*
//! clock (expired by [`MemoryEtcd::run`] or at the next call), whose keys are all deleted at one
//! revision when they expire or are revoked; keep-alive of an expired lease fails; watches from
//! a revision, fed from a bounded history (older revisions are compacted: a watch from one
//! fails with [`EtcdError::Compacted`]), with progress notifications ([`MemoryEtcd::progress`]);
//! restarts that keep the data (every lease's TTL starts over, as after an etcd leader change)
//! or lose it (a new cluster id, revisions start over); a snapshot restored with the same
//! cluster id (the revision goes back); count-only reads at a past revision; explicit
//! compaction.
//!
//! Not modelled: transactions, multiple etcd members and their elections, authentication,
//! request size limits. A watcher that falls more than [`WATCH_BUFFER`] batches behind is
//! cancelled (its stream ends) and must resume from its last revision; etcd instead holds it
//! unsynced in memory.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::api::{
    Change, EtcdApi, EtcdError, KeyValue, LeaseId, Range, Revision, WatchBatch, WatchStream,
};
use crate::runtime::{Instant, SharedClock};

/// Batches a watcher may have waiting before it is cancelled.
pub const WATCH_BUFFER: usize = 256;

/// The shortest lease the store grants (etcd raises shorter TTLs to its minimum).
pub const MIN_TTL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: tokio::sync::mpsc::Sender<Result<WatchBatch, EtcdError>>,
}

struct State {
    cluster_id: u64,
    revision: Revision,
    /// Changes with revisions above this one are kept; a watch from at or below it fails.
    compacted: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, LeaseState>,
    history: VecDeque<Change>,
    history_limit: usize,
    watchers: Vec<Watcher>,
    /// Down: every call fails and nothing expires (the etcd process is not running).
    down: bool,
    observer: Option<Observer>,
}

/// The store's content at one revision, for [`MemoryEtcd::restore`].
#[derive(Clone, Debug)]
pub struct EtcdSnapshot {
    revision: Revision,
    compacted: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, (Duration, BTreeSet<String>)>,
    history: VecDeque<Change>,
}

impl EtcdSnapshot {
    /// The revision it was taken at.
    pub fn revision(&self) -> Revision {
        self.revision
    }
}

/// Told the store's whole content after every change (and after a restart that lost it): a
/// test harness's independent record of what the store held at each revision.
pub type Observer = Arc<dyn Fn(&Range) + Send + Sync>;

/// An etcd store in memory (cheap to clone: clones share the store).
#[derive(Clone)]
pub struct MemoryEtcd {
    state: Arc<Mutex<State>>,
    clock: SharedClock,
}

impl std::fmt::Debug for MemoryEtcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("MemoryEtcd")
            .field("revision", &s.revision)
            .field("keys", &s.kvs.len())
            .field("leases", &s.leases.len())
            .finish()
    }
}

impl MemoryEtcd {
    /// An empty store on `clock` (its leases expire on that clock), keeping the changes of the
    /// last `history_limit` revisions for watches.
    pub fn new(clock: SharedClock, history_limit: usize) -> Self {
        let cluster_id = clock.random_u64();
        Self {
            state: Arc::new(Mutex::new(State {
                cluster_id,
                revision: 1,
                compacted: 0,
                kvs: BTreeMap::new(),
                leases: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: history_limit.max(1),
                watchers: Vec::new(),
                down: false,
                observer: None,
            })),
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current store revision.
    pub fn revision(&self) -> Revision {
        self.lock().revision
    }

    /// The keys held now, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.lock().kvs.keys().cloned().collect()
    }

    /// The live leases.
    pub fn leases(&self) -> Vec<LeaseId> {
        self.lock().leases.keys().copied().collect()
    }

    /// Installs `observer` and tells it the current content.
    pub fn set_observer(&self, observer: Observer) {
        let mut s = self.lock();
        s.observer = Some(observer);
        s.notify_observer();
    }

    /// Expires the leases whose TTL ran out; runs forever, every `every` of the store's clock.
    pub async fn run(&self, every: Duration) {
        loop {
            self.clock.sleep(every).await;
            self.expire();
        }
    }

    /// Expires the leases whose TTL ran out now.
    pub fn expire(&self) {
        let now = self.clock.now();
        let mut s = self.lock();
        if s.down {
            return;
        }
        let due: Vec<LeaseId> = s
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            s.drop_lease(id);
        }
    }

    /// Sends every watcher a progress notification (an empty batch at the current revision).
    pub fn progress(&self) {
        let mut s = self.lock();
        let header_revision = s.revision;
        let cluster_id = s.cluster_id;
        s.watchers.retain(|w| {
            w.tx.try_send(Ok(WatchBatch {
                changes: Vec::new(),
                header_revision,
                cluster_id,
            }))
            .is_ok()
        });
    }

    /// Forgets the changes up to `revision`: watches from there on fail with
    /// [`EtcdError::Compacted`] (`etcdctl compact`).
    pub fn compact(&self, revision: Revision) {
        let mut s = self.lock();
        let revision = revision.min(s.revision);
        s.compact_to(revision);
    }

    /// Stops the etcd process (`down`: every call fails, every watch ends, no lease expires)
    /// or starts it again with its data (every lease's TTL starts over).
    pub fn set_down(&self, down: bool) {
        if down {
            let mut s = self.lock();
            s.down = true;
            s.watchers.clear();
        } else {
            self.lock().down = false;
            self.restart(true);
        }
    }

    fn check_up(&self) -> Result<(), EtcdError> {
        if self.lock().down {
            Err(EtcdError::Unavailable("etcd is down".into()))
        } else {
            Ok(())
        }
    }

    /// The cluster id it answers with.
    pub fn cluster_id(&self) -> u64 {
        self.lock().cluster_id
    }

    /// A copy of the store as it is now (`etcdctl snapshot save`).
    pub fn snapshot(&self) -> EtcdSnapshot {
        let s = self.lock();
        EtcdSnapshot {
            revision: s.revision,
            compacted: s.compacted,
            kvs: s.kvs.clone(),
            leases: s
                .leases
                .iter()
                .map(|(id, l)| (*id, (l.ttl, l.keys.clone())))
                .collect(),
            history: s.history.clone(),
        }
    }

    /// Restores `snapshot` with the **same cluster id** (`etcdctl snapshot restore` with the
    /// same cluster token, and no `--bump-revision`): every watch ends, the revision goes back to
    /// the snapshot's, and the leases it held start their TTL over. Revisions above it will be
    /// reused by other writes: a watcher that resumes from one it saw before misses them.
    pub fn restore(&self, snapshot: &EtcdSnapshot) {
        let now = self.clock.now();
        let mut s = self.lock();
        s.watchers.clear();
        s.revision = snapshot.revision;
        s.compacted = snapshot.compacted;
        s.kvs = snapshot.kvs.clone();
        s.history = snapshot.history.clone();
        s.leases = snapshot
            .leases
            .iter()
            .map(|(id, (ttl, keys))| {
                (
                    *id,
                    LeaseState {
                        ttl: *ttl,
                        deadline: now + *ttl,
                        keys: keys.clone(),
                    },
                )
            })
            .collect();
        s.notify_observer();
    }

    /// Every lease's TTL starts over, watches and data untouched: a new leader took over
    /// (etcd's lessor, promoted, extends every lease it inherits).
    pub fn extend_leases(&self) {
        let now = self.clock.now();
        for l in self.lock().leases.values_mut() {
            l.deadline = now + l.ttl;
        }
    }

    /// A restart: every watch ends. With `keep_data`, keys and leases survive and every lease's
    /// TTL starts over (as etcd does when a new leader takes over); without, the store is new
    /// (another cluster id, revisions from 1).
    pub fn restart(&self, keep_data: bool) {
        let now = self.clock.now();
        let cluster_id = self.clock.random_u64();
        let mut s = self.lock();
        s.watchers.clear();
        if keep_data {
            for l in s.leases.values_mut() {
                l.deadline = now + l.ttl;
            }
        } else {
            s.cluster_id = cluster_id;
            s.revision = 1;
            s.compacted = 0;
            s.kvs.clear();
            s.leases.clear();
            s.history.clear();
            s.notify_observer();
        }
    }
}

impl State {
    /// Whether the store can be read as of `revision`: not beyond its own (etcd: "required
    /// revision is a future revision"), not below its compaction.
    fn readable_at(&self, revision: Revision) -> Result<(), EtcdError> {
        if revision > self.revision {
            return Err(EtcdError::WentBack {
                requested: revision,
                current: self.revision,
            });
        }
        if revision < self.compacted {
            return Err(EtcdError::Compacted {
                requested: revision,
                compacted: self.compacted,
            });
        }
        Ok(())
    }

    fn notify_observer(&self) {
        if let Some(o) = &self.observer {
            o(&Range {
                kvs: self.kvs.values().cloned().collect(),
                revision: self.revision,
                cluster_id: self.cluster_id,
            });
        }
    }

    /// Applies `changes` at the next revision and tells the watchers.
    fn commit(&mut self, changes: Vec<Change>) {
        self.notify_observer();
        for c in &changes {
            self.history.push_back(c.clone());
        }
        // Keep whole revisions only: a watch never sees half of one.
        while self.history.len() > self.history_limit {
            let Some(oldest) = self.history.front().map(Change::revision) else {
                break;
            };
            if oldest == self.revision {
                break;
            }
            self.compact_to(oldest);
        }
        let header_revision = self.revision;
        let cluster_id = self.cluster_id;
        self.watchers.retain(|w| {
            let mine: Vec<Change> = changes
                .iter()
                .filter(|c| c.key().starts_with(&w.prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                return !w.tx.is_closed();
            }
            // A watcher that cannot take the batch is cancelled: its stream ends and it
            // resumes from its last revision.
            w.tx.try_send(Ok(WatchBatch {
                changes: mine,
                header_revision,
                cluster_id,
            }))
            .is_ok()
        });
    }

    fn compact_to(&mut self, revision: Revision) {
        while self
            .history
            .front()
            .is_some_and(|c| c.revision() <= revision)
        {
            self.history.pop_front();
        }
        self.compacted = self.compacted.max(revision);
    }

    /// Removes lease `id` and deletes its keys at one revision.
    fn drop_lease(&mut self, id: LeaseId) {
        let Some(lease) = self.leases.remove(&id) else {
            return;
        };
        let keys: Vec<String> = lease
            .keys
            .into_iter()
            .filter(|k| self.kvs.get(k).is_some_and(|kv| kv.lease == id))
            .collect();
        if keys.is_empty() {
            return;
        }
        self.revision += 1;
        let revision = self.revision;
        let changes = keys
            .into_iter()
            .map(|key| {
                self.kvs.remove(&key);
                Change::Delete { key, revision }
            })
            .collect();
        self.commit(changes);
    }
}

#[async_trait]
impl EtcdApi for MemoryEtcd {
    async fn lease_grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), EtcdError> {
        self.check_up()?;
        self.expire();
        let ttl = Duration::from_secs(ttl.max(MIN_TTL).as_secs_f64().ceil() as u64);
        let now = self.clock.now();
        let mut s = self.lock();
        let id = loop {
            let id = (self.clock.random_u64() >> 2) as LeaseId;
            if id != 0 && !s.leases.contains_key(&id) {
                break id;
            }
        };
        s.leases.insert(
            id,
            LeaseState {
                ttl,
                deadline: now + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok((id, ttl))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, EtcdError> {
        self.check_up()?;
        self.expire();
        let now = self.clock.now();
        let mut s = self.lock();
        let l = s
            .leases
            .get_mut(&lease)
            .ok_or(EtcdError::LeaseNotFound(lease))?;
        l.deadline = now + l.ttl;
        Ok(l.ttl)
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.check_up()?;
        self.expire();
        let mut s = self.lock();
        if !s.leases.contains_key(&lease) {
            return Err(EtcdError::LeaseNotFound(lease));
        }
        s.drop_lease(lease);
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, EtcdError> {
        self.check_up()?;
        self.expire();
        let mut s = self.lock();
        if lease != 0 && !s.leases.contains_key(&lease) {
            return Err(EtcdError::LeaseNotFound(lease));
        }
        // Moving a key to another lease detaches it from the old one.
        let previous = s.kvs.get(key).map(|kv| (kv.lease, kv.create_revision));
        if let Some((old, _)) = previous
            && old != lease
            && let Some(l) = s.leases.get_mut(&old)
        {
            l.keys.remove(key);
        }
        if let Some(l) = s.leases.get_mut(&lease) {
            l.keys.insert(key.to_string());
        }
        s.revision += 1;
        let revision = s.revision;
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision: previous.map_or(revision, |(_, c)| c),
            mod_revision: revision,
            lease,
        };
        s.kvs.insert(key.to_string(), kv.clone());
        s.commit(vec![Change::Put(kv)]);
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> Result<Revision, EtcdError> {
        self.check_up()?;
        self.expire();
        let mut s = self.lock();
        let Some(kv) = s.kvs.remove(key) else {
            return Ok(s.revision);
        };
        if let Some(l) = s.leases.get_mut(&kv.lease) {
            l.keys.remove(key);
        }
        s.revision += 1;
        let revision = s.revision;
        s.commit(vec![Change::Delete {
            key: key.to_string(),
            revision,
        }]);
        Ok(revision)
    }

    async fn range_prefix(&self, prefix: &str) -> Result<Range, EtcdError> {
        self.check_up()?;
        self.expire();
        let s = self.lock();
        Ok(Range {
            kvs: s
                .kvs
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, kv)| kv.clone())
                .collect(),
            revision: s.revision,
            cluster_id: s.cluster_id,
        })
    }

    async fn count_prefix(&self, prefix: &str, revision: Revision) -> Result<i64, EtcdError> {
        self.check_up()?;
        self.expire();
        let s = self.lock();
        s.readable_at(revision)?;
        // Now, less what the changes after `revision` added, plus what they deleted.
        let now = s
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .count() as i64;
        let since: i64 = s
            .history
            .iter()
            .filter(|c| c.revision() > revision && c.key().starts_with(prefix))
            .map(|c| match c {
                Change::Put(kv) if kv.create_revision == kv.mod_revision => -1,
                Change::Put(_) => 0,
                Change::Delete { .. } => 1,
            })
            .sum();
        Ok(now + since)
    }

    async fn mod_revision_at(
        &self,
        key: &str,
        revision: Revision,
    ) -> Result<Option<Revision>, EtcdError> {
        self.check_up()?;
        self.expire();
        let s = self.lock();
        s.readable_at(revision)?;
        // The key's last change at or before `revision` in the history; failing that, its
        // state now if no change came after `revision`; failing that, absent if the first
        // change after `revision` created it. Otherwise its last write before `revision` is
        // older than the history this store keeps: it cannot say when (etcd itself would), and
        // answers as for a compacted revision, which a caller takes as no answer.
        let mut first_later: Option<&Change> = None;
        for c in s.history.iter().rev().filter(|c| c.key() == key) {
            if c.revision() <= revision {
                return Ok(match c {
                    Change::Put(kv) => Some(kv.mod_revision),
                    Change::Delete { .. } => None,
                });
            }
            first_later = Some(c);
        }
        match first_later {
            None => Ok(s.kvs.get(key).map(|kv| kv.mod_revision)),
            Some(Change::Put(kv)) if kv.create_revision == kv.mod_revision => Ok(None),
            Some(_) => Err(EtcdError::Compacted {
                requested: revision,
                compacted: s.compacted,
            }),
        }
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, EtcdError> {
        self.check_up()?;
        self.expire();
        let mut s = self.lock();
        let from = if from <= 0 { s.revision + 1 } else { from };
        if from <= s.compacted {
            return Err(EtcdError::Compacted {
                requested: from,
                compacted: s.compacted,
            });
        }
        if from > s.revision + 1 {
            return Err(EtcdError::WentBack {
                requested: from,
                current: s.revision,
            });
        }
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let backlog: Vec<Change> = s
            .history
            .iter()
            .filter(|c| c.revision() >= from && c.key().starts_with(prefix))
            .cloned()
            .collect();
        if !backlog.is_empty() {
            let _ = tx.try_send(Ok(WatchBatch {
                changes: backlog,
                header_revision: s.revision,
                cluster_id: s.cluster_id,
            }));
        }
        s.watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })))
    }
}
