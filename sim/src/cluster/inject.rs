//! The faults the harness injects into a [`SimCluster`]: cuts and clogs, crashes, restarts,
//! graceful leaves, pauses, clock skew, and what it asks of the control plane (crash, restart,
//! freeze, lost renewals, watch resets), each healing itself when its time is up; and what a
//! Pod's lifecycle does to its endpoint where members are gated by a Service.

use super::*;

impl SimCluster {
    /// Clogs `links` now and unclogs them (healing fault `idx`) after `duration`; `cut` nodes
    /// lose their control plane, and reconnect when it heals.
    pub(crate) fn clog_for(
        self: &Arc<Self>,
        links: Vec<(NodeId, NodeId)>,
        duration: Duration,
        idx: usize,
        cut: usize,
    ) {
        self.reconnected(cut);
        self.links.clog(&links);
        self.refresh_health();
        self.later(duration, move |c| {
            c.reconnected(cut);
            c.links.unclog(&links);
            c.refresh_health();
            c.recorder.fault_healed(idx);
        });
    }

    /// Member `i` as the control plane's faults name it.
    fn member_ref(&self, i: usize) -> MemberRef {
        MemberRef {
            index: i,
            ip: member_ip(i),
            id: self.member_id(i),
        }
    }

    /// Crashes member `i` (its process dies; peers learn through the provider).
    pub fn crash(self: &Arc<Self>, i: usize) {
        let (id, name) = {
            let mut slots = lock(&self.slots);
            let s = &mut slots[i];
            if !s.alive {
                return;
            }
            s.alive = false;
            s.paused = false;
            s.leaving = false;
            (lock(&s.current).take().map(|c| c.id), s.name.clone())
        };
        self.handle.kill(self.node_id(i));
        self.activation.crashed(&name);
        self.failover.node_down(i);
        self.refresh_health();
        self.pod_not_ready_later(&name);
        self.recorder.node_down(&name);
        self.recorder.trace(
            &name,
            format!(
                "crashed ({})",
                id.as_ref().map_or("-".into(), |i| i.to_string())
            ),
        );
        if let Some(id) = id {
            let listing = lock(&self.slots)
                .iter()
                .enumerate()
                .filter(|(_, s)| s.alive)
                .filter(|(_, s)| {
                    lock(&s.current)
                        .as_ref()
                        .is_some_and(|c| c.manager.topology().contains(&id))
                })
                .map(|(j, _)| j)
                .collect();
            self.failover.departed(id.clone(), listing);
            self.judge_departure(i, id, self.oracles.bounds().failover(), "crashed");
        }
    }

    /// Restarts member `i` as a new incarnation (a no-op when it is running).
    pub fn restart(&self, i: usize) {
        let mut slots = lock(&self.slots);
        let s = &mut slots[i];
        if s.alive {
            return;
        }
        s.alive = true;
        s.stop.requested.store(false, Ordering::SeqCst);
        *lock(&s.stop.done) = None;
        let id = s.node.id();
        let name = s.name.clone();
        drop(slots);
        self.reconnected(1);
        self.handle.restart(id);
        self.refresh_health();
        self.recorder.trace(&name, "restarted");
    }

    /// Asks member `i` to shut down gracefully; once it has, its node stops and the failover
    /// oracle judges how fast survivors saw it go.
    pub(crate) fn leave(self: &Arc<Self>, i: usize, rejoin_after: Option<Duration>, idx: usize) {
        let stop = {
            let mut slots = lock(&self.slots);
            let s = &mut slots[i];
            if !s.alive || s.paused || s.leaving {
                return;
            }
            s.leaving = true;
            s.stop.clone()
        };
        let c = self.clone();
        self.background(async move {
            if let Some(e) = c.endpoints() {
                // The Pod is being deleted: its endpoint goes terminating at once, and the
                // preStop hook waits before the process is told to stop.
                let (pod, incarnation) = {
                    let slots = lock(&c.slots);
                    let id = lock(&slots[i].current).as_ref().map(|inc| inc.id.clone());
                    (pod_name(&slots[i].name), id)
                };
                c.withdraw(&pod, e.generation(&pod), PodState::Terminating);
                sleep(PRE_STOP).await;
                let slots = lock(&c.slots);
                let s = &slots[i];
                let same = lock(&s.current).as_ref().map(|inc| inc.id.clone()) == incarnation;
                if !s.leaving || !s.alive || s.paused || !same {
                    return; // Crashed, frozen or replaced meanwhile.
                }
            }
            let healthy_at_start = c.health.healthy_since(i).is_some();
            stop.requested.store(true, Ordering::SeqCst);
            stop.notify.notify_one();
            c.refresh_health();
            for _ in 0..3_000 {
                if lock(&stop.done).is_some() {
                    break;
                }
                sleep(Duration::from_millis(10)).await;
            }
            // Healthy at the start of the shutdown and at its end, leaving aside the shutdown
            // itself (a fault that cut the member meanwhile may have lost every Leave attempt).
            let was_healthy = healthy_at_start && !c.path_disturbed(i);
            let id = {
                let mut slots = lock(&c.slots);
                let s = &mut slots[i];
                if !s.leaving || !s.alive {
                    return; // Crashed meanwhile.
                }
                s.leaving = false;
                s.alive = false;
                lock(&s.current).take().map(|inc| inc.id)
            };
            c.handle.kill(c.node_id(i));
            c.failover.node_down(i);
            c.refresh_health();
            let name = format!("m{i}");
            c.activation.crashed(&name);
            c.recorder.node_down(&name);
            c.recorder.trace(&name, "left gracefully; process ended");
            if let Some(id) = id {
                // A leave that reached a healthy registry is seen at once; otherwise the
                // registration expires like a crashed one.
                let bound = if was_healthy {
                    c.oracles.bounds().delivery() + POLL
                } else {
                    c.oracles.bounds().failover()
                };
                c.judge_departure(i, id, bound, "left gracefully");
            }
            if c.is_healed() {
                c.restart(i);
                return;
            }
            match rejoin_after {
                Some(d) => c.later(d, move |c| {
                    c.restart(i);
                    c.recorder.fault_healed(idx);
                }),
                None => c.recorder.fault_healed(idx),
            }
        });
    }

    /// Applies `fault` now; faults with a duration heal themselves in background tasks.
    pub fn apply(self: &Arc<Self>, fault: &Fault) {
        let names = |ms: &[usize]| ms.iter().map(|i| format!("m{i}")).collect::<Vec<_>>();
        let members = self.member_count();
        let registry = self.registry_node_ids();
        self.recorder.count(&format!("fault: {}", fault.kind()));
        match fault.clone() {
            Fault::Partition {
                members: group,
                with_registry,
                duration,
            } => {
                let group: Vec<usize> = group.into_iter().filter(|&i| i < members).collect();
                let mut ids: BTreeSet<NodeId> = group.iter().map(|&i| self.node_id(i)).collect();
                let lost = if with_registry {
                    ids.extend(registry);
                    self.node_count().saturating_sub(group.len())
                } else {
                    group.len()
                };
                let links = cut(&ids, &self.all_node_ids());
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&group));
                self.clog_for(links, duration, idx, lost);
            }
            Fault::Split { groups, duration } => {
                let mut group_of: BTreeMap<NodeId, usize> = BTreeMap::new();
                for (k, g) in groups.iter().enumerate() {
                    for &i in g.iter().filter(|&&i| i < members) {
                        group_of.entry(self.node_id(i)).or_insert(k + 1);
                    }
                }
                let all = self.all_node_ids();
                let mut links = Vec::new();
                for &a in &all {
                    for &b in &all {
                        if a != b
                            && group_of.get(&a).unwrap_or(&0) != group_of.get(&b).unwrap_or(&0)
                        {
                            links.push((a, b));
                        }
                    }
                }
                let hit: Vec<usize> = groups
                    .iter()
                    .flatten()
                    .copied()
                    .filter(|&i| i < members)
                    .collect();
                let idx = self.recorder.fault_started(fault.to_string(), names(&hit));
                self.clog_for(links, duration, idx, hit.len());
            }
            Fault::OneWay {
                from: member,
                duration,
            }
            | Fault::ReplyLost { member, duration }
            | Fault::BackendCut { member, duration } => {
                if registry.is_empty() || member >= members {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                let m = self.node_id(member);
                // One-way: the member's requests are lost; reply-lost: the answers are;
                // backend-cut: both (its peers still reach it). From every backend node.
                let links = registry
                    .iter()
                    .flat_map(|&r| match fault {
                        Fault::OneWay { .. } => vec![(m, r)],
                        Fault::ReplyLost { .. } => vec![(r, m)],
                        _ => vec![(m, r), (r, m)],
                    })
                    .collect();
                self.clog_for(links, duration, idx, 1);
            }
            Fault::Swizzle {
                members: order,
                step,
                hold,
            } => {
                if registry.is_empty() {
                    return;
                }
                let order: Vec<usize> = order.into_iter().filter(|&i| i < members).collect();
                self.reconnected(order.len());
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&order));
                let c = self.clone();
                self.background(async move {
                    let link = |i: usize| {
                        let n = c.node_id(i);
                        registry
                            .iter()
                            .flat_map(|&r| [(n, r), (r, n)])
                            .collect::<Vec<_>>()
                    };
                    for &i in &order {
                        if c.is_healed() {
                            return;
                        }
                        c.links.clog(&link(i));
                        c.refresh_health();
                        sleep(step).await;
                    }
                    sleep(hold).await;
                    // Unclog in another order: every other one first, then the rest.
                    let mut again: Vec<usize> = order.iter().copied().step_by(2).collect();
                    again.extend(order.iter().copied().skip(1).step_by(2));
                    for i in again {
                        if c.is_healed() {
                            return;
                        }
                        c.links.unclog(&link(i));
                        c.reconnected(1);
                        c.refresh_health();
                        sleep(step).await;
                    }
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::HeartbeatLoss { member, duration } => {
                if member >= members {
                    return;
                }
                let m = self.member_ref(member);
                if !self.control.lose_renewals(&m, true) {
                    return;
                }
                self.reconnected(1);
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                lock(&self.slots)[member].lost_heartbeats = true;
                self.refresh_health();
                self.later(duration, move |c| {
                    c.control.lose_renewals(&m, false);
                    lock(&c.slots)[member].lost_heartbeats = false;
                    c.reconnected(1);
                    c.refresh_health();
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::Crash {
                member,
                restart_after,
            } => {
                if member >= members {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                self.crash(member);
                if let Some(d) = restart_after {
                    self.later(d, move |c| {
                        c.restart(member);
                        c.recorder.fault_healed(idx);
                    });
                }
            }
            Fault::Leave {
                member,
                rejoin_after,
            } => {
                if member >= members {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                self.leave(member, rejoin_after, idx);
            }
            Fault::Pause { member, duration } => {
                if member >= members || !lock(&self.slots)[member].alive {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                lock(&self.slots)[member].paused = true;
                self.reconnected(1);
                self.handle.pause(self.node_id(member));
                self.refresh_health();
                let name = lock(&self.slots)[member].name.clone();
                self.activation.set_paused(&name, true);
                self.pod_not_ready_later(&name);
                self.later(duration, move |c| {
                    c.resume(member);
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::ClockSkew {
                member,
                offset_ms,
                drift_ppm,
            } => {
                if member >= members {
                    return;
                }
                self.recorder
                    .fault_started(fault.to_string(), names(&[member]));
                let clock = {
                    let mut slots = lock(&self.slots);
                    let bound = i64::from(shoal::provider::LeaseTiming::DEFAULT_MAX_DRIFT_PPM);
                    slots[member].wild_clock |= drift_ppm.abs() > bound;
                    if slots[member].wild_clock {
                        self.activation.set_wild(&slots[member].name);
                    }
                    slots[member].clock.clone()
                };
                clock.set_wall_offset_ms(offset_ms);
                clock.set_drift_ppm(drift_ppm);
            }
            Fault::RegistryClock {
                offset_ms,
                drift_ppm,
            } => {
                let Some(clock) = self.control.clock() else {
                    return;
                };
                self.recorder
                    .fault_started(fault.to_string(), vec![self.control.name().into()]);
                clock.set_wall_offset_ms(offset_ms);
                clock.set_drift_ppm(drift_ppm.clamp(
                    -crate::faults::REGISTRY_MAX_DRIFT_PPM,
                    crate::faults::REGISTRY_MAX_DRIFT_PPM,
                ));
            }
            Fault::RegistryClockStep { back_ms, down_for } => {
                let Some(clock) = self.control.clock() else {
                    return;
                };
                let (offset, _) = clock.skew();
                clock.set_wall_offset_ms(offset - back_ms as i64);
                self.crash_registry(fault, down_for, Store::Kept);
            }
            Fault::RegistryRestart { down_for } => {
                self.crash_registry(fault, down_for, Store::Kept)
            }
            Fault::BackendDataLoss { down_for } => {
                self.crash_registry(fault, down_for, Store::Lost)
            }
            Fault::BackendSnapshot => {
                if self.control.save_snapshot() {
                    self.recorder.trace(self.control.name(), "snapshot saved");
                    self.recorder.count("backend: snapshots saved");
                }
            }
            Fault::BackendRestore { down_for } => {
                self.crash_registry(fault, down_for, Store::Restored)
            }
            Fault::BackendMemberFreeze { member, duration } => {
                if let Some(k) = self.control.freeze_member(member) {
                    self.backend_member_lost(fault, k, duration, move |c| c.thaw_member(k));
                }
            }
            Fault::BackendMemberCrash { member, down_for } => {
                if let Some((k, crash)) = self.control.crash_member(member) {
                    self.backend_member_lost(fault, k, down_for, move |c| {
                        c.restart_member_after(k, crash)
                    });
                }
            }
            Fault::BackendAuthChange => {
                if self.control.change_auth() {
                    self.recorder
                        .trace(self.control.name(), "auth store changed");
                    self.recorder.count("backend: auth store changes");
                }
            }
            Fault::RegistryPause { duration } => {
                if !self.control.pause() {
                    return;
                }
                self.reconnected(self.node_count());
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), vec![self.control.name().into()]);
                self.refresh_health();
                self.later(duration, move |c| {
                    c.reconnected(c.node_count());
                    c.control.resume();
                    c.refresh_health();
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::RollingRestart { gap } => {
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&(0..members).collect::<Vec<_>>()));
                let c = self.clone();
                self.background(async move {
                    for i in 0..members {
                        if c.is_healed() {
                            return;
                        }
                        c.crash(i);
                        sleep(Duration::from_millis(200)).await;
                        c.restart(i);
                        sleep(gap).await;
                    }
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::Flap {
                member,
                times,
                period,
            } => {
                if member >= members {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                let links = cut(
                    &BTreeSet::from([self.node_id(member)]),
                    &self.all_node_ids(),
                );
                let c = self.clone();
                self.background(async move {
                    for _ in 0..times {
                        if c.is_healed() {
                            return;
                        }
                        c.links.clog(&links);
                        c.reconnected(1);
                        c.refresh_health();
                        sleep(period).await;
                        c.links.unclog(&links);
                        c.reconnected(1);
                        c.refresh_health();
                        sleep(period).await;
                    }
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::SlowAnswers {
                member,
                delay,
                duration,
            }
            | Fault::LaggingWatch {
                member,
                delay,
                duration,
            } => {
                if member >= members {
                    return;
                }
                let ip = member_ip(member);
                let answers = matches!(fault, Fault::SlowAnswers { .. });
                let set = move |c: &Self, d: Option<Duration>| match c.control.delays() {
                    Some(delays) if answers => delays.set_answers(ip, d),
                    Some(delays) => delays.set_watches(ip, d),
                    None => {}
                };
                if self.control.delays().is_none() {
                    return;
                }
                set(self, Some(delay));
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                self.later(duration, move |c| {
                    set(c, None);
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::StreamReset { times, period } => {
                if self.control.node().is_none() {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), vec![self.control.name().into()]);
                let c = self.clone();
                self.background(async move {
                    for k in 0..times {
                        if c.is_healed() {
                            return;
                        }
                        if k > 0 {
                            sleep(period).await;
                        }
                        c.reconnected(c.node_count());
                        c.control.reset_streams();
                    }
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::Throttle {
                duration,
                retry_after_s,
            } => {
                if !self
                    .control
                    .shed_reads(Some(Duration::from_secs(retry_after_s)))
                {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), vec![self.control.name().into()]);
                // Every watch ends too (the restart that starts such a storm), so every member
                // lists and watches again into the shedding.
                self.reconnected(self.node_count());
                self.control.reset_streams();
                self.later(duration, move |c| {
                    c.control.shed_reads(None);
                    c.reconnected(c.node_count());
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::Describe { member, generation } => {
                if member >= members {
                    return;
                }
                let signal = {
                    let slots = lock(&self.slots);
                    let s = &slots[member];
                    let running = lock(&s.current)
                        .as_ref()
                        .is_some_and(|i| i.ready_at.is_some());
                    (s.alive && !s.leaving && running).then(|| s.describe.clone())
                };
                let Some(signal) = signal else {
                    self.recorder
                        .count("fault: describe skipped (member not running)");
                    return;
                };
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                *lock(&signal.generation) = Some(generation);
                signal.notify.notify_one();
                self.recorder.fault_healed(idx);
            }
        }
    }

    /// Crashes the control plane (`lose_data`: with its store) and restarts it after
    /// `down_for`.
    pub(crate) fn crash_registry(
        self: &Arc<Self>,
        fault: &Fault,
        down_for: Duration,
        store: Store,
    ) {
        let Some(crash) = self.control.crash(store) else {
            return;
        };
        let idx = self
            .recorder
            .fault_started(fault.to_string(), vec![self.control.name().into()]);
        self.reconnected(self.node_count());
        self.refresh_health();
        self.recorder.trace(self.control.name(), "crashed");
        self.later(down_for, move |c| {
            // Only the latest crash's restart brings it back.
            c.reconnected(c.node_count());
            c.control.restart_after(crash);
            c.refresh_health();
            c.recorder.fault_healed(idx);
        });
    }

    /// Backend member `k` froze or crashed (`fault`): any node may have to move to another
    /// member; `back` brings it back after `lasts`.
    fn backend_member_lost(
        self: &Arc<Self>,
        fault: &Fault,
        k: usize,
        lasts: Duration,
        back: impl FnOnce(&dyn ControlPlane) + Send + 'static,
    ) {
        self.reconnected(self.node_count());
        let idx = self.recorder.fault_started(
            fault.to_string(),
            vec![format!("{}{k}", self.control.name())],
        );
        self.refresh_health();
        self.later(lasts, move |c| {
            back(c.control.as_ref());
            c.refresh_health();
            c.recorder.fault_healed(idx);
        });
    }

    /// `n` nodes had to reconnect to the control plane (the load budget's allowance).
    pub(crate) fn reconnected(&self, n: usize) {
        self.reconnects.fetch_add(n as u64, Ordering::SeqCst);
    }

    pub(crate) fn resume(&self, i: usize) {
        let mut slots = lock(&self.slots);
        if slots[i].paused {
            slots[i].paused = false;
            slots[i].unpaused_at = Some(Instant::now());
            self.activation.set_paused(&slots[i].name, false);
            let id = slots[i].node.id();
            let pod = pod_name(&slots[i].name);
            drop(slots);
            self.reconnected(1);
            self.handle.resume(id);
            if let Some(e) = self.endpoints() {
                // Its readiness probe passes again.
                e.update(&pod, e.generation(&pod), PodState::Serving);
            }
            self.refresh_health();
        }
    }

    /// The endpoints controller, when members are gated by a Service.
    pub(crate) fn endpoints(&self) -> Option<Arc<EndpointController>> {
        self.control.endpoints()
    }

    /// A Pod that crashed or froze fails its readiness probe: its endpoint is not ready 3 s
    /// later (three probes), unless it was restarted meanwhile.
    pub(crate) fn pod_not_ready_later(self: &Arc<Self>, node: &str) {
        let Some(e) = self.endpoints() else { return };
        let pod = pod_name(node);
        let generation = e.generation(&pod);
        self.later(Duration::from_secs(3), move |c| {
            let still_down = lock(&c.slots)
                .iter()
                .any(|s| pod_name(&s.name) == pod && (!s.alive || s.paused));
            if still_down {
                c.withdraw(&pod, generation, PodState::NotReady);
            }
        });
    }
}
