//! What the provider lists and watches: the members' Leases (records), a Service's
//! EndpointSlices, and the heartbeats of one shard; what each tells the view.

use super::*;

/// What the provider lists and watches: a kind of object and a selection of it.
#[async_trait]
pub(super) trait Watched: Send + Sync + 'static {
    type Obj: Object + PartialEq;
    /// For logs.
    fn kind(&self) -> String;
    /// The resource it reads: a 429's `Retry-After` holds back every list and watch of it
    /// (API Priority and Fairness sheds by flow, not by watch).
    fn resource(&self) -> &'static str;
    /// Its cache in the view; `None` once it is no longer watched (the task ends).
    fn reflector<'v>(&self, view: &'v mut View) -> Option<&'v mut Reflector<Self::Obj>>;
    async fn list(
        &self,
        session: &Session,
        options: &ListOptions,
    ) -> Result<ObjectList<Self::Obj>, CallError>;
    async fn watch(
        &self,
        session: &Session,
        from: &str,
    ) -> Result<WatchStream<Self::Obj>, CallError>;
    /// What a list tells the view besides the objects (called before the cache takes it).
    fn listed(&self, _view: &mut View, _list: &ObjectList<Self::Obj>, _now: Instant) {}
    /// What an event tells the view besides the object (called before the cache takes it).
    fn observed(&self, _view: &mut View, _event: &WatchEvent<Self::Obj>, _now: Instant) {}
    /// What changed in the cache once it took a list or an event.
    fn taken(&self, _view: &mut View, _outcome: &Outcome) {}
}

/// The members' Leases (with sharded heartbeats: their records), labelled with the cluster.
pub(super) struct Records;

#[async_trait]
impl Watched for Records {
    type Obj = Lease;

    fn kind(&self) -> String {
        "Leases".into()
    }

    fn resource(&self) -> &'static str {
        "leases"
    }

    fn reflector<'v>(&self, view: &'v mut View) -> Option<&'v mut Reflector<Lease>> {
        Some(&mut view.leases)
    }

    async fn list(
        &self,
        s: &Session,
        options: &ListOptions,
    ) -> Result<ObjectList<Lease>, CallError> {
        let what = || {
            format!(
                "list Leases in {} labelled {CLUSTER_LABEL}={}",
                s.namespace(),
                s.ctx.cluster_name
            )
        };
        s.list_call(
            what,
            s.api.list_leases(s.namespace(), &s.selector(), options),
        )
        .await
    }

    async fn watch(&self, s: &Session, from: &str) -> Result<WatchStream<Lease>, CallError> {
        let what = || {
            format!(
                "watch Leases in {} labelled {CLUSTER_LABEL}={}",
                s.namespace(),
                s.ctx.cluster_name
            )
        };
        s.call(what, s.api.watch_leases(s.namespace(), &s.selector(), from))
            .await
    }

    fn listed(&self, view: &mut View, list: &ObjectList<Lease>, now: Instant) {
        if view.sharded() {
            // Records are never renewed: their ages mean nothing. A record of this member
            // listed once and missing from a later list (never older) was deleted.
            let own = &mut view.own_record;
            if let Some(name) = &own.name {
                let there = list.items.iter().any(|l| l.meta.name == *name);
                own.deleted |= own.seen && !there;
                own.seen |= there;
            }
            // Unmarked records (members that renew their own Lease) age as they renew.
            let unmarked: BTreeSet<String> = list
                .items
                .iter()
                .filter(|l| !is_marked(l))
                .map(|l| l.meta.name.clone())
                .collect();
            for gone in view.unmarked.difference(&unmarked) {
                view.liveness.forget(gone);
            }
            view.mismatched
                .retain(|name| list.items.iter().any(|l| l.meta.name == *name));
            for l in &list.items {
                observe_record(view, l, now);
            }
            view.unmarked = unmarked;
            view.unbeaten.all = true;
        } else {
            view.liveness.replace_all(&list.items, now);
        }
        let changed = view.index.replace_all(&list.items);
        if changed {
            view.listing.all_changed(&view.index);
        }
        view.by_address.replace_all(&list.items);
        view.dirty |= changed || !view.leases.is_synced();
    }

    fn observed(&self, view: &mut View, event: &WatchEvent<Lease>, now: Instant) {
        if matches!(view.leases.next(), Next::List { .. }) {
            return;
        }
        let sharded = view.sharded();
        match event {
            WatchEvent::Added(l) | WatchEvent::Modified(l) => {
                if sharded {
                    if view.own_record.name.as_ref() == Some(&l.meta.name) {
                        view.own_record.seen = true;
                    }
                    observe_record(view, l, now);
                    if is_marked(l) {
                        if view.unmarked.remove(&l.meta.name) {
                            view.liveness.forget(&l.meta.name);
                        }
                    } else {
                        view.unmarked.insert(l.meta.name.clone());
                    }
                } else {
                    view.liveness.observe(l, now);
                }
                if sharded && !view.leases.objects().contains_key(&l.meta.name) {
                    view.unbeaten.records.insert(l.meta.name.clone());
                }
                let changed = view.index.upsert(l);
                if changed {
                    view.listing.lease_changed(&l.meta.name);
                }
                view.by_address.upsert(l);
                view.dirty |= changed;
            }
            WatchEvent::Deleted(l) => {
                if sharded {
                    if view.own_record.name.as_ref() == Some(&l.meta.name) {
                        view.own_record.deleted = true;
                    }
                    view.liveness.forget_expected(&heartbeat_name(&l.meta.name));
                    if view.unmarked.remove(&l.meta.name) {
                        view.liveness.forget(&l.meta.name);
                    }
                    view.mismatched.remove(&l.meta.name);
                } else {
                    view.liveness.forget(&l.meta.name);
                }
                let changed = view.index.remove(&l.meta.name);
                if changed {
                    view.listing.lease_changed(&l.meta.name);
                }
                view.by_address.remove(&l.meta.name);
                view.dirty |= changed;
            }
            WatchEvent::Bookmark(_) => {}
        }
    }
}

/// Sharded heartbeats: what a record tells this member besides the member it describes. An
/// unmarked record is a member that renews its own Lease (a cluster migrating between
/// settings): it ages as it renews, as on members with that setting. A marked record of
/// another setting is a configuration error, logged once.
fn observe_record(view: &mut View, record: &Lease, now: Instant) {
    if !is_marked(record) {
        if !sim::flaw("k8s-unmarked-unaged") {
            view.liveness.observe(record, now);
        }
        return;
    }
    let Some((shards, monitors)) = view.sharding else {
        return;
    };
    let mark = &record.meta.annotations[HEARTBEATS_ANNOTATION];
    // Compared without building our own mark: this runs on every record event.
    let same = mark
        .split_once('/')
        .is_some_and(|(s, k)| s.parse() == Ok(shards) && k.parse() == Ok(monitors));
    if !same {
        if view.mismatched.insert(record.meta.name.clone()) {
            tracing::error!(lease = %record.meta.name, theirs = %mark, ours = %heartbeats_mark(shards, monitors), "a member uses other heartbeat shards or monitors: its heartbeats are not where this member looks (every member with sharded heartbeats must use the same setting)");
        }
    } else {
        view.mismatched.remove(&record.meta.name);
    }
}

/// A Service's EndpointSlices.
pub(super) struct Slices;

#[async_trait]
impl Watched for Slices {
    type Obj = EndpointSlice;

    fn kind(&self) -> String {
        "EndpointSlices".into()
    }

    fn resource(&self) -> &'static str {
        "endpointslices"
    }

    fn reflector<'v>(&self, view: &'v mut View) -> Option<&'v mut Reflector<EndpointSlice>> {
        view.slices.as_mut()
    }

    async fn list(
        &self,
        s: &Session,
        options: &ListOptions,
    ) -> Result<ObjectList<EndpointSlice>, CallError> {
        let service = s.config.service.clone().unwrap_or_default();
        let what = || format!("list EndpointSlices of Service {}/{service}", s.namespace());
        s.list_call(
            what,
            s.api.list_endpoint_slices(s.namespace(), &service, options),
        )
        .await
    }

    async fn watch(
        &self,
        s: &Session,
        from: &str,
    ) -> Result<WatchStream<EndpointSlice>, CallError> {
        let service = s.config.service.clone().unwrap_or_default();
        let what = || {
            format!(
                "watch EndpointSlices of Service {}/{service}",
                s.namespace()
            )
        };
        s.call(
            what,
            s.api.watch_endpoint_slices(s.namespace(), &service, from),
        )
        .await
    }

    fn listed(&self, view: &mut View, _list: &ObjectList<EndpointSlice>, _now: Instant) {
        view.dirty = true;
    }

    fn observed(&self, view: &mut View, event: &WatchEvent<EndpointSlice>, _now: Instant) {
        view.dirty |=
            !matches!(event, WatchEvent::Bookmark(_)) && !sim::flaw("k8s-slice-change-ignored");
        let View {
            slices, listing, ..
        } = view;
        let Some(slices) = slices.as_ref().filter(|s| s.takes_events()) else {
            return;
        };
        match event {
            WatchEvent::Added(after) | WatchEvent::Modified(after) => {
                let before = slices.objects().get(&after.meta.name);
                listing.slice_event(&after.meta.name, before, Some(after));
            }
            WatchEvent::Deleted(gone) => {
                let before = slices.objects().get(&gone.meta.name);
                listing.slice_event(&gone.meta.name, before, None);
            }
            WatchEvent::Bookmark(_) => {}
        }
    }

    fn taken(&self, view: &mut View, outcome: &Outcome) {
        let View {
            slices, listing, ..
        } = view;
        let Some(slices) = slices else {
            return;
        };
        match outcome {
            Outcome::Replaced => listing.slices_replaced(slices.objects()),
            Outcome::Upserted(_) | Outcome::Removed(_) | Outcome::Unchanged => {
                listing.recompute(slices.objects());
            }
        }
    }
}

/// The heartbeats of one shard this member monitors (sharded heartbeats).
pub(super) struct Shard(pub(super) u32);

impl Shard {
    fn selector(&self, s: &Session) -> LabelSelector {
        let mut selector = shard_selector(&s.ctx.cluster_name, self.0);
        if sim::flaw("k8s-heartbeats-unsharded") {
            selector.remove(crate::kubernetes::shards::SHARD_LABEL);
        }
        selector
    }
}

#[async_trait]
impl Watched for Shard {
    type Obj = Lease;

    fn kind(&self) -> String {
        format!("heartbeats of shard {}", self.0)
    }

    fn resource(&self) -> &'static str {
        "leases"
    }

    fn reflector<'v>(&self, view: &'v mut View) -> Option<&'v mut Reflector<Lease>> {
        view.heartbeats.get_mut(&self.0)
    }

    async fn list(
        &self,
        s: &Session,
        options: &ListOptions,
    ) -> Result<ObjectList<Lease>, CallError> {
        let what = || {
            format!(
                "list heartbeat Leases of shard {} in {}",
                self.0,
                s.namespace()
            )
        };
        let selector = self.selector(s);
        s.list_call(what, s.api.list_leases(s.namespace(), &selector, options))
            .await
    }

    async fn watch(&self, s: &Session, from: &str) -> Result<WatchStream<Lease>, CallError> {
        let what = || {
            format!(
                "watch heartbeat Leases of shard {} in {}",
                self.0,
                s.namespace()
            )
        };
        let selector = self.selector(s);
        s.call(what, s.api.watch_leases(s.namespace(), &selector, from))
            .await
    }

    fn listed(&self, view: &mut View, list: &ObjectList<Lease>, now: Instant) {
        // Exactly these heartbeats of the shard exist; a heartbeat first seen now ages from
        // now. Expected-but-missing heartbeats (records without one) keep their age.
        let listed: BTreeSet<&str> = list.items.iter().map(|l| l.meta.name.as_str()).collect();
        let gone: Vec<String> = view
            .heartbeats
            .get(&self.0)
            .into_iter()
            .flat_map(|r| r.objects().keys())
            .filter(|name| !listed.contains(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            view.liveness.forget(&name);
        }
        for l in &list.items {
            view.liveness.observe(l, now);
        }
        view.unbeaten.all = true;
    }

    fn observed(&self, view: &mut View, event: &WatchEvent<Lease>, now: Instant) {
        if matches!(
            view.heartbeats.get(&self.0).map(Reflector::next),
            Some(Next::List { .. })
        ) {
            return;
        }
        match event {
            WatchEvent::Added(l) | WatchEvent::Modified(l) => view.liveness.observe(l, now),
            WatchEvent::Deleted(l) => {
                view.liveness.forget(&l.meta.name);
                let record = record_name(&l.meta.name).to_string();
                if view.leases.objects().contains_key(&record)
                    && !sim::flaw("k8s-orphan-record-aged")
                {
                    // The heartbeat went before its record: a monitor removed the member (a
                    // graceful leave deletes the record first) and may have died before it
                    // deleted the record too, or a person deleted the heartbeat. The member
                    // is gone either way: its record is removed a short while later (by
                    // whoever monitors the shard, after checking the heartbeat is absent),
                    // unless its record goes meanwhile, as it does when the remover lives.
                    view.liveness.expect(&l.meta.name, Duration::ZERO, now);
                    view.orphans.insert(l.meta.name.clone());
                }
                view.unbeaten.records.insert(record);
            }
            WatchEvent::Bookmark(_) => {}
        }
    }
}
