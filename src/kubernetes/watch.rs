//! The list / watch / relist state machine, pure: fed what the API answered, it keeps a cache of
//! one kind of object and says what to ask next.
//!
//! Like client-go's reflector: list, then watch from the list's resource version, moving it on
//! with every event and bookmark; when the server answers `410 Gone` (the version was compacted
//! away), list again and swap the whole cache at once, so no object vanishes between the relist
//! and its answer. The first list asks for any state (`"0"`) and a relist for a state "not
//! older than" the last version seen, both of which the API server serves from its watch
//! cache; only a relist the server answered 410 is a quorum read from etcd (client-go's
//! `relistResourceVersion`: a thousand members starting at once cost the API server's cache a
//! thousand lists, not etcd a thousand reads of every object). Any other watch failure resumes
//! from the version held. The async driver only does the calls.

use std::collections::BTreeMap;

use super::api::{ApiError, Object, ObjectList, WatchEvent};

/// What to ask the API server next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// List (first sync, or the watch's version is gone).
    List {
        /// Not older than this version (empty: the newest, a quorum read).
        resource_version: String,
    },
    /// Watch from this resource version.
    Watch {
        /// The version held.
        resource_version: String,
    },
}

/// What an answer changed in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The whole cache was replaced by a list (objects may have appeared and vanished).
    Replaced,
    /// This object was added or changed.
    Upserted(String),
    /// This object was removed.
    Removed(String),
    /// Nothing in the cache changed (a bookmark, a duplicate, a deletion of an unknown object).
    Unchanged,
}

/// The cache of one kind of object, by name, and where its watch stands.
#[derive(Clone, Debug)]
pub struct Reflector<T> {
    objects: BTreeMap<String, T>,
    /// `None` until listed, and again after a `410 Gone` (the cache is kept until the relist).
    resource_version: Option<String>,
    /// The newest version seen (list, event or bookmark): a relist asks for a state not older
    /// than it. [`ANY`] before the first list; empty after a relist answered `410 Gone` (the
    /// next list is a quorum read).
    last_synced: String,
    /// Whether the cache holds a list at all (an empty cache before the first list is not an
    /// empty cluster).
    synced: bool,
    relists: u64,
}

/// The resource version that asks for any state (`"0"`): the API server answers from its watch
/// cache, however far behind it is. A reflector's first list asks for it.
pub const ANY: &str = "0";

impl<T: Object + PartialEq> Default for Reflector<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Object + PartialEq> Reflector<T> {
    /// An empty, unsynced cache, whose first list asks for any state ([`ANY`]).
    pub fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            resource_version: None,
            last_synced: ANY.to_string(),
            synced: false,
            relists: 0,
        }
    }

    /// An empty, unsynced cache whose first list asks for a state not older than
    /// `resource_version` (of the same resource, seen by another of this client's watches):
    /// the API server serves it from its watch cache, not with a quorum read from etcd. A
    /// member that starts monitoring a heartbeat shard lists it this way (at scale, monitors
    /// move with every membership change). Empty: a quorum read.
    pub fn not_older_than(resource_version: &str) -> Self {
        Self {
            last_synced: resource_version.to_string(),
            ..Self::new()
        }
    }

    /// The newest version seen (list, event or bookmark); [`ANY`] before the first list.
    pub fn last_synced(&self) -> &str {
        &self.last_synced
    }

    /// What to ask next.
    pub fn next(&self) -> Next {
        match &self.resource_version {
            None => Next::List {
                resource_version: self.last_synced.clone(),
            },
            Some(rv) => Next::Watch {
                resource_version: rv.clone(),
            },
        }
    }

    /// A list answered: the cache becomes exactly its items, at once.
    pub fn listed(&mut self, list: ObjectList<T>) -> Outcome {
        if self.synced {
            self.relists += 1;
        }
        self.objects = list
            .items
            .into_iter()
            .map(|o| (o.meta().name.clone(), o))
            .collect();
        self.last_synced = list.resource_version.clone();
        self.resource_version = Some(list.resource_version);
        self.synced = true;
        Outcome::Replaced
    }

    /// Whether [`Self::event`] takes events now (not before a list, nor after a relist was
    /// refused as too old: the next list covers them).
    pub fn takes_events(&self) -> bool {
        self.resource_version.is_some()
    }

    /// A watch event arrived. Events before the first list are ignored (the list covers them).
    pub fn event(&mut self, event: WatchEvent<T>) -> Outcome {
        if self.resource_version.is_none() {
            return Outcome::Unchanged;
        }
        let (rv, outcome) = match event {
            WatchEvent::Bookmark(rv) => (rv, Outcome::Unchanged),
            WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                let rv = o.meta().resource_version.clone();
                let name = o.meta().name.clone();
                let outcome = if self.objects.get(&name) == Some(&o) {
                    Outcome::Unchanged
                } else {
                    self.objects.insert(name.clone(), o);
                    Outcome::Upserted(name)
                };
                (rv, outcome)
            }
            WatchEvent::Deleted(o) => {
                let rv = o.meta().resource_version.clone();
                let name = o.meta().name.clone();
                let outcome = match self.objects.remove(&name) {
                    Some(_) => Outcome::Removed(name),
                    None => Outcome::Unchanged,
                };
                (rv, outcome)
            }
        };
        if !rv.is_empty() {
            self.last_synced = rv.clone();
            self.resource_version = Some(rv);
        }
        outcome
    }

    /// The watch (or list) failed. `Gone` on a watch: the version held is no longer served,
    /// relist not older than it (the cache stays as it is until the list answers); `Gone` on
    /// that relist: list the newest state. Anything else: retry from where it stood.
    pub fn failed(&mut self, error: &ApiError) {
        if !matches!(error, ApiError::Gone(_)) || crate::runtime::sim::flaw("k8s-410-not-relisted")
        {
            return;
        }
        if self.resource_version.is_none() {
            self.last_synced.clear();
        }
        self.resource_version = None;
    }

    /// The cached objects, by name.
    pub fn objects(&self) -> &BTreeMap<String, T> {
        &self.objects
    }

    /// Whether the cache reflects at least one list.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Lists after the first (each after a `410 Gone`).
    pub fn relists(&self) -> u64 {
        self.relists
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::api::{Lease, ObjectMeta};

    fn lease(name: &str, rv: &str, holder: &str) -> Lease {
        Lease {
            meta: ObjectMeta {
                name: name.into(),
                resource_version: rv.into(),
                ..ObjectMeta::default()
            },
            holder_identity: Some(holder.into()),
            ..Lease::default()
        }
    }

    fn list(items: Vec<Lease>, rv: &str) -> ObjectList<Lease> {
        ObjectList {
            items,
            resource_version: rv.into(),
            continue_token: None,
        }
    }

    fn names(r: &Reflector<Lease>) -> Vec<&str> {
        r.objects().keys().map(String::as_str).collect()
    }

    #[test]
    fn lists_then_watches_from_the_list_and_moves_on_with_every_event() {
        let mut r = Reflector::new();
        assert_eq!(
            r.next(),
            Next::List {
                resource_version: ANY.into()
            },
            "the first list is served from the watch cache"
        );
        assert!(!r.is_synced());
        // An event before the first list is covered by the list.
        assert_eq!(
            r.event(WatchEvent::Added(lease("x", "1", "x"))),
            Outcome::Unchanged
        );
        assert_eq!(
            r.listed(list(vec![lease("a", "5", "a")], "7")),
            Outcome::Replaced
        );
        assert!(r.is_synced());
        assert_eq!(
            r.next(),
            Next::Watch {
                resource_version: "7".into()
            }
        );
        assert_eq!(
            r.event(WatchEvent::Added(lease("b", "8", "b"))),
            Outcome::Upserted("b".into())
        );
        assert_eq!(
            r.event(WatchEvent::Modified(lease("a", "9", "a2"))),
            Outcome::Upserted("a".into())
        );
        assert_eq!(r.objects()["a"].holder_identity.as_deref(), Some("a2"));
        assert_eq!(
            r.event(WatchEvent::Bookmark("12".into())),
            Outcome::Unchanged
        );
        assert_eq!(
            r.next(),
            Next::Watch {
                resource_version: "12".into()
            }
        );
        assert_eq!(
            r.event(WatchEvent::Deleted(lease("b", "13", "b"))),
            Outcome::Removed("b".into())
        );
        assert_eq!(names(&r), ["a"]);
    }

    #[test]
    fn duplicates_and_unknown_deletions_change_nothing() {
        let mut r = Reflector::new();
        r.listed(list(vec![lease("a", "5", "a")], "5"));
        // A watch resumed from an older version repeats an event the cache has.
        assert_eq!(
            r.event(WatchEvent::Added(lease("a", "5", "a"))),
            Outcome::Unchanged
        );
        assert_eq!(
            r.event(WatchEvent::Deleted(lease("zz", "6", "zz"))),
            Outcome::Unchanged
        );
        assert_eq!(names(&r), ["a"]);
        assert_eq!(
            r.next(),
            Next::Watch {
                resource_version: "6".into()
            }
        );
    }

    #[test]
    fn gone_relists_and_swaps_the_cache_at_once_keeping_it_meanwhile() {
        let mut r = Reflector::new();
        r.listed(list(vec![lease("a", "1", "a"), lease("b", "2", "b")], "2"));
        r.failed(&ApiError::Unavailable("connection reset".into()));
        assert_eq!(
            r.next(),
            Next::Watch {
                resource_version: "2".into()
            },
            "a dropped watch resumes where it stood"
        );
        r.failed(&ApiError::Gone("too old resource version: 2".into()));
        assert_eq!(
            r.next(),
            Next::List {
                resource_version: "2".into()
            },
            "the relist is served from the watch cache, not older than what was seen"
        );
        // Until the relist answers, nobody vanishes (events are ignored: the list covers them).
        assert_eq!(names(&r), ["a", "b"]);
        assert_eq!(
            r.event(WatchEvent::Deleted(lease("a", "3", "a"))),
            Outcome::Unchanged
        );
        assert_eq!(names(&r), ["a", "b"]);
        // b left and c joined while the watch was gone: one swap.
        assert_eq!(
            r.listed(list(vec![lease("a", "1", "a"), lease("c", "9", "c")], "10")),
            Outcome::Replaced
        );
        assert_eq!(names(&r), ["a", "c"]);
        assert_eq!(r.relists(), 1);
        // A relist the server answers 410 (a cache that cannot serve it) goes to a quorum read.
        r.failed(&ApiError::Gone("too old resource version: 10".into()));
        assert_eq!(
            r.next(),
            Next::List {
                resource_version: "10".into()
            }
        );
        r.failed(&ApiError::Gone("too old resource version: 10".into()));
        assert_eq!(
            r.next(),
            Next::List {
                resource_version: String::new()
            }
        );
        // A failure other than 410 keeps where the relist stood.
        r.failed(&ApiError::Unavailable("reset".into()));
        assert_eq!(
            r.next(),
            Next::List {
                resource_version: String::new()
            }
        );
    }
}
