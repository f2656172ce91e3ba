//! The oracles that judge from the nodes' views after a fault: failover (no survivor that was
//! connected throughout still lists a departed member after the bound) and Service gating (no
//! such node lists a member whose endpoint the controller withdrew).

use super::*;

impl SimCluster {
    /// The failover oracle: `bound` after member `departed` (incarnation `id`) crashed or left,
    /// no survivor that was connected throughout may still list it.
    pub(crate) fn judge_departure(
        self: &Arc<Self>,
        departed: usize,
        id: MemberId,
        bound: Duration,
        how: &'static str,
    ) {
        if self.control.node().is_none() {
            return; // In memory: a departure is seen at once, there is nothing to judge.
        }
        let at = Instant::now();
        // Sharded heartbeats: only the monitors of its shard (as the design specifies them,
        // among the members the API server lists now) remove it.
        let monitors = self
            .control
            .listed()
            .and_then(|(_, t)| self.oracles.spec_monitors_of(&id, &t));
        let c = self.clone();
        self.background(async move {
            sleep(bound).await;
            let mut waited = bound;
            // A renewal the backend accepted after the departure (sent before it and held on
            // the way: a frozen etcd member that answers its queue when it thaws) extended the
            // lease: judged a bound after that renewal.
            let mut why_later = None;
            if let Some(late) = c.oracles.last_renewal(&id).filter(|r| *r > at) {
                let more = (late + bound).saturating_duration_since(Instant::now());
                if !more.is_zero() {
                    c.recorder
                        .count("failover: judged from a renewal accepted after the departure");
                    sleep(more).await;
                    waited += more;
                    why_later = Some("a bound after a renewal etcd accepted after the departure");
                }
            }
            // A watch stalled on a frozen or crashed backend member: its node's view moves
            // again once the node notices the silence and moves (or the member is back).
            if let Some(until) = c.views_stalled_until(at) {
                let more = (until + c.oracles.bounds().delivery() + POLL)
                    .saturating_duration_since(Instant::now());
                if !more.is_zero() {
                    c.recorder.count(
                        "failover: judged after watches stalled on a lost backend member moved",
                    );
                    sleep(more).await;
                    waited += more;
                    why_later = Some(
                        "until watches stalled on a lost backend member had time to move, then delivery",
                    );
                }
            }
            // Sharded heartbeats: a monitor that took the shard over after the crash ages the
            // heartbeat from when it first saw it (docs/providers/kubernetes.md: removed up to
            // one Lease duration later), so a change of the shard's monitors since the crash
            // earns the departure one more bound.
            let expiry = bound > c.oracles.bounds().delivery() + POLL;
            if let Some(before) = monitors.as_ref().filter(|_| expiry) {
                let now = c
                    .control
                    .listed()
                    .and_then(|(_, t)| c.oracles.spec_monitors_of(&id, &t));
                // Or a monitor that left the shard and came back (a member that ranked above it
                // came and went): no monitor but the departed one has been one since the crash.
                let retaken = c.oracles.monitors_since(&id).is_some_and(|since| {
                    since
                        .iter()
                        .filter(|(m, _)| *m != id)
                        .all(|(_, since)| *since > at)
                });
                if retaken || now.is_some_and(|now| now.iter().any(|m| !before.contains(m))) {
                    c.recorder
                        .count("failover: judged one bound later (its shard's monitors changed)");
                    sleep(bound).await;
                    waited += bound;
                    why_later =
                        Some("TTL, sweep and delivery, twice: its shard's monitors changed");
                }
            }
            let views: Vec<(usize, String, Incarnation)> = {
                let slots = lock(&c.slots);
                slots
                    .iter()
                    .enumerate()
                    .filter(|(j, s)| *j != departed && s.alive && !s.paused)
                    .filter_map(|(j, s)| {
                        lock(&s.current).clone().map(|inc| (j, s.name.clone(), inc))
                    })
                    .collect()
            };
            // Kubernetes: a member removes the departed one (deletes its Lease); that needs
            // some other member that could reach the API server the whole time.
            if expiry && c.oracles.bounds().cleaned_by_peers {
                let members = c.member_count();
                let cleaner = views.iter().any(|(k, _, inc)| {
                    *k < members
                        && monitors.as_ref().is_none_or(|m| m.contains(&inc.id))
                        && inc.ready_at.is_some_and(|r| r <= at)
                        && c.health.healthy_since(*k).is_some_and(|h| h <= at)
                });
                if !cleaner {
                    c.recorder.count(if monitors.is_some() {
                        "failover: not judged (no monitor of its shard reached the API server throughout)"
                    } else {
                        "failover: not judged (no member reached the API server throughout)"
                    });
                    return;
                }
            }
            for (_, name, inc) in c.connected_views(at, Some(departed)) {
                if inc.manager.topology().contains(&id) {
                    c.recorder.violation_once(
                        format!("failover {id} {name}"),
                        format!(
                            "failover: {name} still lists {id} {} ms after it {how} (bound {} ms: {}), though {name} was connected throughout",
                            waited.as_millis(),
                            waited.as_millis(),
                            if let Some(why) = why_later {
                                why
                            } else if expiry {
                                "TTL, sweep and delivery"
                            } else {
                                "one delivery after an accepted leave"
                            }
                        ),
                    );
                }
            }
        });
    }

    /// The endpoints controller withdraws Pod `pod` (generation `generation`): its endpoint
    /// goes `state`; the gating oracle then judges that connected nodes stop listing it.
    pub(crate) fn withdraw(self: &Arc<Self>, pod: &str, generation: u64, state: PodState) {
        let Some(e) = self.endpoints() else { return };
        if !e.update(pod, generation, state) {
            return;
        }
        let Some((_, ip, _, change)) = e.state(pod) else {
            return;
        };
        let at = Instant::now();
        let pod = pod.to_string();
        let c = self.clone();
        self.background(async move {
            sleep(WITHDRAWAL).await;
            // Judged only if the endpoint stayed withdrawn (not restarted, not resumed).
            if e.state(&pod).is_none_or(|(.., now)| now != change) || c.is_healed() {
                return;
            }
            let host = ip.to_string();
            for (_, name, inc) in c.connected_views(at, None) {
                let t = inc.manager.topology();
                let Some(m) = t
                    .members()
                    .iter()
                    .find(|m| m.address.rsplit_once(':').is_some_and(|(h, _)| h == host))
                else {
                    continue;
                };
                c.recorder.violation_once(
                    format!("withdrawn {pod} {change} {name}"),
                    format!(
                        "endpoints: {name} still lists {} ({}) {} ms after the endpoint of its Pod {pod} went {state:?} (bound {} ms: one delivery and a watch reopen), though {name} was connected throughout",
                        m.id,
                        m.address,
                        WITHDRAWAL.as_millis(),
                        WITHDRAWAL.as_millis()
                    ),
                );
            }
        });
    }

    /// Nodes other than `except` that are running, started before `at`, and whose path to the
    /// registry (API server) was healthy from before `at` on (long enough for a watch to have
    /// recovered from any earlier fault): they must have seen whatever was published at `at`.
    pub(crate) fn connected_views(
        &self,
        at: Instant,
        except: Option<usize>,
    ) -> Vec<(usize, String, Incarnation)> {
        let views: Vec<(usize, String, Incarnation)> = {
            let slots = lock(&self.slots);
            slots
                .iter()
                .enumerate()
                .filter(|(j, s)| Some(*j) != except && s.alive && !s.paused)
                .filter_map(|(j, s)| lock(&s.current).clone().map(|inc| (j, s.name.clone(), inc)))
                .collect()
        };
        views
            .into_iter()
            .filter(|(j, _, inc)| {
                let (Some(ready), Some(healthy)) = (inc.ready_at, self.health.healthy_since(*j))
                else {
                    return false;
                };
                ready <= at && (healthy <= inc.started_at || healthy + CONNECTED_FOR <= at)
            })
            .collect()
    }
}
