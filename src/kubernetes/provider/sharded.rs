//! Sharded heartbeats (`Heartbeats::Sharded`, docs/providers/kubernetes.md "At scale"): this
//! member's record and heartbeat Leases, the shards it monitors, the heartbeats it expects,
//! and removing a member whose heartbeat expired.

use super::*;

impl Session {
    /// Sharded heartbeats: writes this member's heartbeat Lease (a renewal), and its record
    /// Lease when it has none yet or its description changed. Either found deleted (a monitor
    /// found the heartbeat expired, or a person deleted one) means peers removed this member:
    /// it takes a new incarnation and writes both again at once. The heartbeat is written
    /// first, so a record without a heartbeat is one whose heartbeat was deleted.
    ///
    /// The record is marked (its setting in [`HEARTBEATS_ANNOTATION`]) and states a Lease
    /// duration of [`RECORD_DURATION_FACTOR`] Lease durations: members that renew their own
    /// Lease (a cluster migrating) age it with that duration, and while any is listed this
    /// member touches its record every third of it.
    pub(super) async fn renew_sharded(&self, shards: u32, monitors: u32) -> Result<(), CallError> {
        let _writing = self.writing.lock().await;
        let mut recreated = false;
        let mut adopted = false;
        let ns = self.namespace();
        loop {
            let record_deleted = std::mem::take(&mut lock(&self.view).own_record.deleted);
            if record_deleted && !recreated {
                recreated = true;
                if sim::flaw("k8s-recreate-same-id") {
                    *lock(&self.own_record) = None;
                    *lock(&self.own) = None;
                } else {
                    self.revoked("its record Lease was deleted");
                }
            }
            let (member, generation) = self.descriptions.current(&self.member);
            let sent_at = self.clock().now();
            let wall = self.wall_micros();
            let secs = self
                .config
                .lease_duration
                .as_secs()
                .clamp(1, i32::MAX as u64) as i32;
            let hb = heartbeat_lease(
                &self.ctx.cluster_name,
                ns,
                &member.id,
                shards,
                secs,
                wall,
                self.config.pod.clone(),
            );
            let name = hb.meta.name.clone();
            let Some(result) = self.write_own(hb).await? else {
                continue;
            };
            match result {
                Ok(written) => *lock(&self.own) = Some(written),
                Err(e) if matches!(e.error, ApiError::NotFound(_)) && !recreated => {
                    recreated = true;
                    if sim::flaw("k8s-recreate-same-id") {
                        *lock(&self.own) = None;
                        *lock(&self.own_record) = None;
                    } else {
                        self.revoked("its heartbeat Lease was deleted");
                    }
                    continue;
                }
                Err(e)
                    if matches!(e.error, ApiError::Conflict(_) | ApiError::AlreadyExists(_))
                        && !adopted =>
                {
                    adopted = true;
                    if !self.adopt(&self.own, &name, &member.id).await? && !recreated {
                        recreated = true;
                        self.revoked("its heartbeat Lease was deleted or taken over");
                    }
                    continue;
                }
                Err(e) => {
                    if sim::flaw("k8s-renewed-on-attempt") {
                        self.renewed(sent_at);
                    }
                    return Err(e);
                }
            }
            let has_record = lock(&self.own_record).is_some();
            let record_duration = self.config.lease_duration * RECORD_DURATION_FACTOR;
            let touch = has_record
                && !lock(&self.view).unmarked.is_empty()
                && lock(&self.record_written_at)
                    .is_none_or(|at| sent_at.saturating_duration_since(at) >= record_duration / 3)
                && !sim::flaw("k8s-record-untouched");
            if !has_record || self.descriptions.pending() || touch {
                let mut record = member_lease(
                    &self.ctx.cluster_name,
                    ns,
                    &member,
                    record_duration,
                    wall,
                    self.config.pod.clone(),
                );
                record.meta.annotations.insert(
                    HEARTBEATS_ANNOTATION.to_string(),
                    heartbeats_mark(shards, monitors),
                );
                let record_name = record.meta.name.clone();
                let prev = lock(&self.own_record).clone();
                let result = match &prev {
                    None => {
                        let what = || format!("create Lease {ns}/{record_name}");
                        self.call(what, self.api.create_lease(record)).await
                    }
                    Some(prev) => {
                        record.meta.resource_version = prev.meta.resource_version.clone();
                        record.meta.uid = prev.meta.uid.clone();
                        record.acquire_time_micros = prev.acquire_time_micros;
                        let what = || format!("update Lease {ns}/{record_name}");
                        self.call(what, self.api.replace_lease(record)).await
                    }
                };
                match result {
                    Ok(written) => {
                        *lock(&self.own_record) = Some(written);
                        *lock(&self.record_written_at) = Some(sent_at);
                        if touch {
                            self.metrics.record_touches.inc();
                            tracing::debug!(member = %member.id, "touched this member's record for members that renew their own Lease");
                        }
                        let mut view = lock(&self.view);
                        if view.own_record.name.as_ref() != Some(&record_name) {
                            view.own_record = OwnRecord {
                                name: Some(record_name),
                                ..OwnRecord::default()
                            };
                        }
                    }
                    Err(e) if matches!(e.error, ApiError::NotFound(_)) && !recreated => {
                        recreated = true;
                        self.revoked("its record Lease was deleted");
                        continue;
                    }
                    Err(e)
                        if matches!(
                            e.error,
                            ApiError::Conflict(_) | ApiError::AlreadyExists(_)
                        ) && !adopted =>
                    {
                        adopted = true;
                        if !self
                            .adopt(&self.own_record, &record_name, &member.id)
                            .await?
                            && !recreated
                        {
                            recreated = true;
                            self.revoked("its record Lease was deleted or taken over");
                        }
                        continue;
                    }
                    Err(e) => {
                        if matches!(e.error, ApiError::Rejected(_)) && self.descriptions.pending() {
                            self.descriptions.refuse(&self.member, e.to_string());
                        }
                        return Err(e);
                    }
                }
                if self.descriptions.accepted(&member, generation) {
                    self.metrics.description_updates.inc();
                    tracing::info!(member = %member.id, kinds = ?member.kinds, zone = ?member.zone, "this member's record Lease carries its new description");
                }
            }
            self.metrics.renewals.inc();
            self.renewed(sent_at);
            return Ok(());
        }
    }

    /// Sharded heartbeats: which shards this member monitors, from the members of the
    /// topology it issued last (every member computes the same from the same members).
    pub(super) fn assign_shards(&self, view: &mut View, shards: u32, monitors: u32, now: Instant) {
        if view.assigned == Some(view.version) {
            return;
        }
        view.assigned = Some(view.version);
        let moved = std::mem::take(&mut view.moved);
        // Monitors are chosen among the members with sharded heartbeats (marked records):
        // members that renew their own Lease watch no heartbeats.
        let cluster = &self.ctx.cluster_name;
        let unmarked = &view.unmarked;
        let marked = |id: &MemberId| {
            !unmarked.contains(&lease_name(cluster, id)) || sim::flaw("k8s-unmarked-monitors")
        };
        let all = match &mut view.monitors {
            Some(all) => {
                // What changed since the topology the monitors were computed from.
                for (id, joined) in moved.iter().filter(|(id, _)| marked(id)) {
                    match joined {
                        Some(zone) => all.add(id, zone.as_deref()),
                        None => all.remove(id),
                    }
                }
                all
            }
            None => {
                let all = view.monitors.insert(Monitors::new(shards, monitors));
                all.set(applied_zones(&view.applied).filter(|(id, _)| marked(id)));
                all
            }
        };
        // Checked against the monitors computed from scratch (small clusters).
        if sim::self_checks() && view.applied.as_ref().is_some_and(|t| t.len() <= 64) {
            let scratch = Monitors::of_members(
                applied_zones(&view.applied).filter(|(id, _)| marked(id)),
                shards,
                monitors,
            );
            assert!(
                *all == scratch,
                "self-check of the heartbeat monitors: incremental {all:?}, from scratch {scratch:?}"
            );
        }
        let me = self.member_id();
        let mine = all.shards_of(&me);
        if mine.keys().eq(view.monitored.keys()) {
            view.monitored = mine;
            return;
        }
        view.heartbeats.retain(|s, _| mine.contains_key(s));
        // A new shard is listed from the watch cache, not older than what the records' watch
        // saw (same resource, same versions): at scale, monitors move at every membership
        // change, and each quorum read would go to etcd.
        let seen = view.leases.last_synced();
        for s in mine.keys() {
            view.heartbeats
                .entry(*s)
                .or_insert_with(|| Reflector::not_older_than(seen));
        }
        let unmarked = &view.unmarked;
        view.liveness.park(
            |name| {
                unmarked.contains(name)
                    || self
                        .heartbeat_shard(name)
                        .is_some_and(|s| mine.contains_key(&s))
            },
            now,
        );
        self.metrics.monitor_changes.inc();
        tracing::info!(member = %me, shards = ?mine.keys().collect::<Vec<_>>(), "monitoring heartbeat shards");
        view.monitored = mine;
        view.unbeaten.all = true;
        self.shards_changed.notify_one();
    }

    /// Sharded heartbeats: a record in a monitored shard whose heartbeat the shard's watch
    /// does not show ages as a heartbeat that never renews (its member died between the two
    /// writes' deletions, or a deletion of its record failed).
    pub(super) fn expect_heartbeats(&self, view: &mut View, now: Instant) {
        if !view.unbeaten.pending() {
            return;
        }
        let unbeaten = std::mem::take(&mut view.unbeaten);
        let records: Vec<String> = if unbeaten.all {
            view.leases.objects().keys().cloned().collect()
        } else {
            unbeaten
                .records
                .into_iter()
                .filter(|r| view.leases.objects().contains_key(r))
                .collect()
        };
        for record in records {
            if view.unmarked.contains(&record) {
                continue; // Renews itself: no heartbeat.
            }
            let heartbeat = heartbeat_name(&record);
            let Some(shard) = self.heartbeat_shard(&heartbeat) else {
                continue;
            };
            let synced = view.heartbeats.get(&shard).is_some_and(|r| r.is_synced());
            if synced && !view.liveness.knows(&heartbeat) {
                view.liveness
                    .expect(&heartbeat, self.config.lease_duration, now);
            }
        }
    }

    /// Sharded heartbeats: removes the member whose heartbeat `heartbeat` expired at resource
    /// version `rv`: deletes the heartbeat with that version as a precondition (a renewal that
    /// got there first wins: `Conflict`), then the record, which every member sees go. An
    /// empty `rv` is a heartbeat never seen: it is read first, and if it exists after all,
    /// aged from now instead. Whether the member was removed.
    pub(super) async fn clean_member(&self, heartbeat: &str, rv: &str) -> Result<bool, CallError> {
        let ns = self.namespace();
        let record = record_name(heartbeat);
        if rv == UNCONDITIONAL {
            // An earlier incarnation of this process (no renewal to race with): its record
            // first, which every member drops at once, then its heartbeat.
            let gone = self.delete_if_there(record, None).await?;
            self.delete_if_there(heartbeat, None).await?;
            return Ok(gone);
        }
        if rv.is_empty() {
            self.metrics.heartbeats_missing.inc();
            let get = || format!("get Lease {ns}/{heartbeat}");
            if let Some(l) = self.call(get, self.api.get_lease(ns, heartbeat)).await? {
                lock(&self.view).liveness.observe(&l, self.clock().now());
                return Ok(false);
            }
        } else {
            let precondition = (!sim::flaw("clean-without-precondition")).then_some(rv);
            // Gone already: another monitor got there first; the record goes all the same.
            self.delete_if_there(heartbeat, precondition).await?;
        }
        match self.delete_if_there(record, None).await {
            Ok(gone) => Ok(gone),
            Err(e) => {
                // The heartbeat is gone: the retry must not wait for a version of it.
                lock(&self.view).liveness.expect(
                    heartbeat,
                    self.config.lease_duration,
                    self.clock().now(),
                );
                Err(e)
            }
        }
    }

    /// Deletes Lease `name` (with `precondition` as its resource version, if any); whether it
    /// was there to delete.
    async fn delete_if_there(
        &self,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<bool, CallError> {
        let ns = self.namespace();
        let what = || format!("delete Lease {ns}/{name}");
        match self
            .call(what, self.api.delete_lease(ns, name, precondition))
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.error, ApiError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sharded heartbeats: runs a list-and-watch of each shard this member monitors.
    pub(super) async fn monitor_loop(self: Arc<Self>) {
        let mut running: BTreeMap<u32, TaskSet> = BTreeMap::new();
        loop {
            let changed = self.shards_changed.notified();
            let wanted: BTreeSet<u32> = lock(&self.view).heartbeats.keys().copied().collect();
            // Dropping a shard's task set stops its watch.
            running.retain(|s, _| wanted.contains(s));
            for s in wanted {
                running.entry(s).or_insert_with(|| {
                    vec![self.clock().spawn(
                        "kubernetes-heartbeats",
                        Box::pin(self.clone().reflect(Shard(s))),
                    )]
                    .into()
                });
            }
            changed.await;
        }
    }
}
