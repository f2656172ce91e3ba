//! The etcd boundary: the calls the provider makes, and what they return.
//!
//! The only thing that differs between production (the `etcd-client` crate against a real
//! etcd) and simulation (an etcd node over the simulated network). Revisions are etcd's: one
//! counter for the whole store, raised by every write, so "the state as of revision r" is the
//! same on every node that has seen r.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

/// An etcd store revision.
pub type Revision = i64;

/// An etcd lease id.
pub type LeaseId = i64;

/// One key and its value as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created the key (since its last deletion).
    pub create_revision: Revision,
    /// The revision of its last write.
    pub mod_revision: Revision,
    /// The lease it is bound to (0: none).
    pub lease: LeaseId,
}

/// One change under a watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A key was written (created or updated).
    Put(KeyValue),
    /// A key was deleted (by a delete, or with its lease) at `revision`.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: Revision,
    },
}

impl Change {
    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Change::Put(kv) => kv.mod_revision,
            Change::Delete { revision, .. } => *revision,
        }
    }

    /// The key changed.
    pub fn key(&self) -> &str {
        match self {
            Change::Put(kv) => &kv.key,
            Change::Delete { key, .. } => key,
        }
    }
}

/// One watch response: changes in revision order, never splitting one revision's changes
/// (a lease that expires deletes all its keys at one revision); no changes is a progress
/// notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// The changes.
    pub changes: Vec<Change>,
    /// The store's revision when the batch was sent.
    pub header_revision: Revision,
    /// The etcd cluster's id: another one, or a header revision below what the watcher has
    /// seen, means the store lost its data (the watcher must list again).
    pub cluster_id: u64,
}

/// A consistent read of every key under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// The keys, sorted.
    pub kvs: Vec<KeyValue>,
    /// The store revision the read reflects.
    pub revision: Revision,
    /// The etcd cluster's id: a store that lost its data (a new cluster) has another one, and
    /// its revisions start over.
    pub cluster_id: u64,
}

/// What an etcd call can fail with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// Not reachable, timed out, no leader, or the stream ended.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A watch asked for a revision older than the oldest the store keeps.
    #[error("revision {requested} is compacted (the store keeps revisions from {compacted} on)")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The store's compaction revision.
        compacted: Revision,
    },
    /// A watch asked for a revision beyond the store's next one: the store went back (restored
    /// from a snapshot with the same cluster id, or an etcd that lost its data), so what the
    /// watcher saw after `current` may never have happened here. The view must be listed again.
    #[error(
        "revision {requested} is beyond the store's next one (it is at {current}): the store went back"
    )]
    WentBack {
        /// The revision asked for.
        requested: Revision,
        /// The store's revision.
        current: Revision,
    },
    /// The lease expired or was revoked.
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// Refused: authentication, permission, a bad request.
    #[error("refused: {0}")]
    Rejected(String),
}

/// A watch: batches until it fails or ends.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, EtcdError>> + Send>>;

/// The etcd calls the provider makes.
#[async_trait]
pub trait EtcdApi: Send + Sync + 'static {
    /// Grants a lease of `ttl`; returns its id and the TTL the server granted (it may raise a
    /// TTL below its minimum).
    async fn lease_grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), EtcdError>;
    /// Refreshes `lease` to its full TTL; returns that TTL.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, EtcdError>;
    /// Revokes `lease`, deleting every key bound to it.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError>;
    /// Writes `key` bound to `lease` (0: none); returns the write's revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, EtcdError>;
    /// Deletes `key`; returns the store revision after it.
    async fn delete(&self, key: &str) -> Result<Revision, EtcdError>;
    /// Reads every key under `prefix`.
    async fn range_prefix(&self, prefix: &str) -> Result<Range, EtcdError>;
    /// How many keys were under `prefix` at store revision `revision` (a linearizable,
    /// count-only read of the store's history: constant-size answer). Fails with
    /// [`EtcdError::Compacted`] below the compaction and with [`EtcdError::WentBack`] beyond
    /// the store's revision (etcd: "required revision is a future revision"; after a restore
    /// from a snapshot, a revision the watcher saw may not exist any more).
    async fn count_prefix(&self, prefix: &str, revision: Revision) -> Result<i64, EtcdError>;
    /// The revision of `key`'s last write as of store revision `revision` (`None`: it did not
    /// exist then): a keys-only point read of the store's history, failing like
    /// [`Self::count_prefix`] below the compaction and beyond the store's revision. Two
    /// histories of one store (before and after a restore with the same cluster id) that agree
    /// on a key's write at one revision agree on that write.
    async fn mod_revision_at(
        &self,
        key: &str,
        revision: Revision,
    ) -> Result<Option<Revision>, EtcdError>;
    /// Watches every key under `prefix` from revision `from` (inclusive). A compacted `from`
    /// fails with [`EtcdError::Compacted`], at once or as the stream's first item; a `from`
    /// beyond the store's next revision with [`EtcdError::WentBack`] (etcd itself would wait
    /// for it, silently: after a restore the revisions are reused by other writes).
    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, EtcdError>;
}
