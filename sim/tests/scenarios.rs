//! Simulated clusters in `cargo test` (simulated build only): every scenario over a fixed seed
//! range, the regression seeds, determinism, and proof that every checker fires on a
//! deliberately broken provider.
#![cfg(madsim)]

use shoal_sim::flaw::Flaw;
use shoal_sim::scenario::{self, RunOptions, SeedReport, run_seed_isolated};

fn run(name: &str, seed: u64, flaw: Flaw) -> SeedReport {
    let s = scenario::by_name(name).unwrap_or_else(|| panic!("no scenario {name}"));
    run_seed_isolated(
        &s,
        seed,
        &RunOptions {
            keep_trace: false,
            flaw,
            schedule: None,
            knobs: None,
        },
    )
}

#[test]
fn every_scenario_passes_a_fixed_seed_range_and_reaches_the_paths_it_claims() {
    for s in scenario::all() {
        // Large scenarios run one seed here (their seeds_divisor): the campaign runs more.
        let seeds = if s.name == "swarm" {
            1..41
        } else {
            1..1 + s.seeds_in(8)
        };
        let mut paths: std::collections::BTreeMap<String, u64> = Default::default();
        for seed in seeds {
            let r = run(s.name, seed, Flaw::None);
            assert!(
                r.passed(),
                "{} seed {seed} failed: {:#?}\nschedule: {}\nreplay: {}",
                s.name,
                r.recording.violations,
                r.schedule.describe(),
                r.replay_command()
            );
            for (p, n) in r.recording.paths {
                *paths.entry(p).or_default() += n;
            }
        }
        for claimed in s.covers {
            assert!(
                paths.get(*claimed).copied().unwrap_or(0) > 0,
                "{} claims to cover {claimed:?} but no seed reached it: {paths:#?}",
                s.name
            );
        }
    }
}

/// Seeds that once failed, one `scenario seed` per line (`#` comments), replayed on every run.
#[test]
fn regression_seeds_pass() {
    let text = include_str!("../regressions.txt");
    let mut n = 0;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut parts = line.splitn(3, ' ');
        let (name, seed) = (
            parts.next().unwrap(),
            parts.next().unwrap().parse::<u64>().unwrap(),
        );
        let schedule = parts
            .next()
            .map(|json| serde_json::from_str(json).expect("a fault schedule"));
        let s = scenario::by_name(name).unwrap_or_else(|| panic!("no scenario {name}"));
        let opts = RunOptions {
            keep_trace: false,
            flaw: Flaw::None,
            schedule,
            knobs: None,
        };
        let (a, b) = (
            run_seed_isolated(&s, seed, &opts),
            run_seed_isolated(&s, seed, &opts),
        );
        assert!(
            a.passed(),
            "{name} seed {seed}: {:#?}\nschedule: {}",
            a.recording.violations,
            a.schedule.describe()
        );
        assert_eq!(
            a.recording.digest, b.recording.digest,
            "{name} seed {seed} replays exactly"
        );
        n += 1;
    }
    assert!(n > 0, "the regressions file lists seeds");
}

/// Every scenario replays bit-for-bit: two runs of one seed give the same trace digest. (This
/// caught an unbiased `tokio::select!`, whose branch order comes from tokio's own unseeded RNG.)
#[test]
fn every_scenario_is_deterministic() {
    for s in scenario::all() {
        let seeds: &[u64] = if s.seeds_divisor > 1 { &[3] } else { &[3, 21] };
        for &seed in seeds {
            let opts = RunOptions {
                keep_trace: false,
                ..RunOptions::default()
            };
            let a = run_seed_isolated(&s, seed, &opts);
            let b = run_seed_isolated(&s, seed, &opts);
            assert_eq!(
                a.recording.digest, b.recording.digest,
                "{} seed {seed} is not deterministic",
                s.name
            );
        }
    }
}

#[test]
fn a_seed_replays_exactly() {
    let s = scenario::by_name("swarm").unwrap();
    let opts = RunOptions {
        keep_trace: true,
        ..RunOptions::default()
    };
    let a = run_seed_isolated(&s, 7, &opts);
    let b = run_seed_isolated(&s, 7, &opts);
    assert!(a.recording.trace.len() > 20);
    assert_eq!(a.recording.digest, b.recording.digest);
    assert_eq!(a.recording.trace, b.recording.trace);
    let c = run_seed_isolated(&s, 8, &opts);
    assert_ne!(
        a.recording.digest, c.recording.digest,
        "another seed is another run"
    );
}

fn first_failure(name: &str, flaw: Flaw, needle: &str) -> String {
    first_failure_within(name, flaw, needle, 6)
}

/// The first violation containing `needle` in the given seeds of scenario `name` (seeds known
/// to catch a flaw that needs a rare interleaving: the search stops at the first that does).
fn failure_in_seeds(name: &str, seeds: &[u64], flaw: Flaw, needle: &str) -> String {
    seeds
        .iter()
        .find_map(|seed| {
            run(name, *seed, flaw)
                .recording
                .violations
                .into_iter()
                .find(|v| v.contains(needle))
        })
        .unwrap_or_else(|| panic!("no seed of {seeds:?} of {name} caught {flaw:?} ({needle:?})"))
}

/// [`first_failure`] over seeds `1..=seeds` (for a flaw that needs a rarer interleaving).
fn first_failure_within(name: &str, flaw: Flaw, needle: &str, seeds: u64) -> String {
    for seed in 1..=seeds {
        let r = run(name, seed, flaw);
        if let Some(v) = r.recording.violations.iter().find(|v| v.contains(needle)) {
            return v.clone();
        }
    }
    panic!("the {needle:?} checker never fired on flaw {flaw:?} in {name}");
}

#[test]
fn version_checker_fires_on_a_provider_that_applies_stale_versions() {
    let v = first_failure("member-crash", Flaw::StaleReplay, "went backwards");
    assert!(v.starts_with("t=") && v.contains("m0"), "{v}");
}

/// Across a registry restart, a node that re-applies a topology of the run it left has gone
/// back in time even though the numbers grew: the versions checker tracks epochs.
#[test]
fn version_checker_fires_on_a_stale_replay_across_a_registry_epoch() {
    let v = first_failure(
        "registry-clock-step",
        Flaw::StaleReplay,
        "which it had left",
    );
    assert!(v.contains("m0"), "{v}");
}

#[test]
fn agreement_checker_fires_on_a_provider_that_corrupts_placement() {
    let v = first_failure("steady", Flaw::CorruptPlacement, "disagree on the owner");
    assert!(v.contains("says"), "{v}");
}

#[test]
fn lease_oracle_fires_on_a_registry_that_never_expires() {
    let v = first_failure(
        "member-crash",
        Flaw::NeverExpire,
        "lease: the registry still lists",
    );
    assert!(v.contains("after it last accepted a heartbeat"), "{v}");
}

#[test]
fn lease_oracle_fires_on_heartbeats_that_do_not_renew() {
    let v = first_failure(
        "steady",
        Flaw::HeartbeatNoRenew,
        "after the registry accepted its last heartbeat",
    );
    assert!(v.contains("lease:"), "{v}");
}

#[test]
fn false_expiry_oracle_fires_when_a_healthy_member_expires() {
    let v = first_failure("steady", Flaw::HeartbeatNoRenew, "must never expire");
    assert!(v.contains("healthy for"), "{v}");
}

#[test]
fn lease_oracle_fires_on_a_lease_extended_by_half_the_ttl() {
    let v = first_failure(
        "member-crash",
        Flaw::ShortLease,
        "after the registry accepted its last heartbeat",
    );
    assert!(v.contains("TTL 6000 ms"), "{v}");
}

#[test]
fn failover_oracle_fires_when_expiries_are_not_broadcast() {
    let v = first_failure("member-crash", Flaw::SweepNoBroadcast, "failover:");
    assert!(v.contains("still lists") && v.contains("crashed"), "{v}");
}

#[test]
fn failover_oracle_fires_when_a_graceful_shutdown_skips_leave() {
    let v = first_failure(
        "graceful-leave",
        Flaw::ShutdownSkipsLeave,
        "left gracefully",
    );
    assert!(v.contains("failover:"), "{v}");
}

#[test]
fn history_oracle_fires_on_a_provider_that_drops_departures_from_updates() {
    let v = first_failure("member-crash", Flaw::UpdateIgnoresLeft, "history:");
    assert!(v.contains("but the registry issued"), "{v}");
}

#[test]
fn history_oracle_fires_on_a_provider_that_corrupts_placement() {
    let v = first_failure("steady", Flaw::CorruptPlacement, "history:");
    assert!(v.contains("192.0.2.1:1"), "{v}");
}

#[test]
fn workload_fires_on_an_owner_cache_that_does_not_report_moves() {
    let v = first_failure("member-crash", Flaw::RebalanceUnreported, "placement:");
    assert!(v.contains("a fresh computation says"), "{v}");
}

#[test]
fn invariants_fire_on_an_owner_cache_that_ignores_joins() {
    let v = first_failure("member-crash", Flaw::RebalanceIgnoresJoins, "owner cache");
    assert!(v.contains("panicked") && v.contains("elects"), "{v}");
}

#[test]
fn invariants_fire_on_a_leave_that_publishes_nothing() {
    let v = first_failure("graceful-leave", Flaw::LeaveNoPublish, "registered");
    assert!(
        v.contains("panicked") && v.contains("topology lists"),
        "{v}"
    );
}

#[test]
fn liveness_checker_fires_on_a_provider_that_never_rejoins() {
    let v = first_failure("partition-heal", Flaw::NoRejoin, "liveness: not converged");
    assert!(v.contains("live members are"), "{v}");
}

/// A registry restarted with its clock behind issues lower versions in a new epoch; a provider
/// that compares snapshots by version alone freezes.
#[test]
fn liveness_checker_fires_on_a_provider_that_ignores_the_registry_epoch() {
    let v = first_failure(
        "registry-clock-step",
        Flaw::SnapshotIgnoresEpoch,
        "liveness: not converged",
    );
    assert!(v.contains("live members are"), "{v}");
}

/// A member cut off from the registry must tell its application before the registry expires
/// it; a provider that counts its lease from every heartbeat attempt (not from the last one the
/// registry accepted) never does.
#[test]
fn self_awareness_oracle_fires_on_a_provider_that_renews_its_lease_on_attempts() {
    let v = first_failure(
        "partition-heal",
        Flaw::LeaseRenewedOnAttempt,
        "had not announced MembershipLost",
    );
    assert!(v.contains("expired"), "{v}");
}

/// An id the registry removed never comes back. The provider re-joins as a new incarnation and
/// the registry refuses removed ids, so it takes a registry that forgets expired ids *and* a
/// join held past the expiry (a join retried while cut off, delivered after the heal:
/// seeds that caught it on 2026-12-08, after the partition service started before the join;
/// any of them firing is enough) to break it.
#[test]
fn resurrection_oracle_fires_on_a_registry_that_forgets_expired_ids() {
    let seeds = [
        ("partition-heal", 21),
        ("partition-heal", 24),
        ("partition-heal", 58),
    ];
    let v = seeds.iter().find_map(|(name, seed)| {
        run(name, *seed, Flaw::ExpiryNotBuried)
            .recording
            .violations
            .into_iter()
            .find(|v| v.contains("listed again"))
    });
    let v = v.unwrap_or_else(|| panic!("no seed of {seeds:?} caught expiry-not-buried"));
    assert!(v.contains("new incarnation"), "{v}");
}

/// A registry that wakes from a stall longer than the TTL must not expire everyone: the lease
/// oracle holds it to extending every lease by the stall.
#[test]
fn lease_oracle_fires_on_a_registry_that_does_not_extend_leases_after_a_stall() {
    let v = first_failure("registry-pause", Flaw::StallNotExtended, "registry stalls");
    assert!(v.contains("was expired"), "{v}");
}

/// madsim's own determinism check: two runs of one seed draw the same random numbers in the
/// same order (it logs every draw and compares).
/// A member's new description sent in snapshots but left out of updates: watchers that follow
/// updates hold a description the member no longer has. Judged against the join the harness saw
/// the registry accept, not against the registry's own topology.
#[test]
fn description_oracle_fires_on_updates_that_leave_out_changed_members() {
    let v = first_failure(
        "describe",
        Flaw::UpdateOmitsChanged,
        "accepted that member's join",
    );
    assert!(v.contains("history: the registry issued"), "{v}");
}

#[test]
fn history_oracle_fires_on_a_provider_that_ignores_changed_members() {
    let v = first_failure("describe", Flaw::UpdateIgnoresChanged, "history:");
    assert!(v.contains("in the node's view"), "{v}");
}

#[test]
fn invariants_fire_on_a_registry_that_does_not_store_a_new_description() {
    let v = first_failure("describe", Flaw::ChangedNotPatched, "not registered");
    assert!(v.contains("panicked"), "{v}");
}

/// A coalesced update that leaves out departures: watchers following updates keep listing a
/// member that the snapshots of the same version no longer have.
#[test]
fn history_oracle_fires_on_coalesced_updates_that_drop_departures() {
    // It takes a departure coalesced with another change: a few swarm seeds in a hundred
    // (seed 9 since the simulated transport changed on 2026-12-02; seeds 61, 127 and 149 of
    // 1-200 since renewals start on a fixed schedule, 2026-12-07).
    let v = failure_in_seeds(
        "swarm",
        &[61, 127, 149],
        Flaw::CoalescedDropsLeft,
        "history:",
    );
    assert!(v.contains("two different topologies"), "{v}");
}

/// A compressed-snapshot cache looked up without the version: members that accept compression
/// get an older version's members under the new version's number.
#[test]
fn history_oracle_fires_on_a_compressed_snapshot_cache_that_ignores_versions() {
    let v = first_failure("member-crash", Flaw::CompressedCacheAnyVersion, "history:");
    assert!(v.contains("two different topologies"), "{v}");
}

#[test]
fn madsim_sees_the_same_random_draws_twice() {
    let seed = 11;
    let config = shoal_sim::knobs::Knobs::for_seed(seed).madsim_config();
    let recording = madsim::runtime::Runtime::check_determinism(seed, config, || async {
        scenario::simulate(scenario::by_name("swarm").unwrap(), 11).await
    });
    assert!(
        recording.violations.is_empty(),
        "{:?}",
        recording.violations
    );
}

#[test]
fn liveness_checker_fires_on_a_watch_that_freezes() {
    let v = first_failure("member-crash", Flaw::FreezeWatch, "liveness: not converged");
    assert!(v.contains("live members are"), "{v}");
}

#[test]
fn failover_latency_is_recorded_for_every_crash() {
    // In-contract messages only: where the door drops updates, a watcher may learn of a
    // departure at the next progress message (the failover oracle allows for it).
    let r = run_knobs("member-crash", 3, Flaw::None, |k| k.out_of_contract = false);
    assert_eq!(r.recording.failovers.len(), 2, "two crashes, two failovers");
    let ttl = shoal::registry::RegistryConfig::default().ttl;
    for f in &r.recording.failovers {
        assert!(
            *f <= ttl + std::time::Duration::from_secs(2),
            "failover took {f:?}"
        );
    }
}

// The Kubernetes provider: each checker fires on a one-line bug planted in the real code.

/// client-go's rule (a Lease ages by the time since this node last saw it change, whether or
/// not this node could write meanwhile): after an API-server freeze, the first member to
/// renew deletes a peer that could not renew yet.
#[test]
fn lease_oracle_fires_on_kubernetes_leases_aging_while_nobody_could_renew() {
    let v = first_failure(
        "k8s-apiserver-down",
        Flaw::K8sAgesWhileSilent,
        "stalls since",
    );
    assert!(v.contains("was expired"), "{v}");
}

/// A cleaner that deletes without the resource-version precondition deletes a Lease renewed
/// after it looked: a live member is removed.
#[test]
fn lease_oracle_fires_on_kubernetes_deletes_without_a_precondition() {
    let v = first_failure_within(
        "k8s-everyone-network",
        Flaw::K8sCleanWithoutPrecondition,
        "lease:",
        15,
    );
    assert!(
        v.contains("was expired") || v.contains("had not announced MembershipLost"),
        "{v}"
    );
}

#[test]
fn failover_checker_fires_on_a_kubernetes_shutdown_that_keeps_its_lease() {
    let v = first_failure(
        "k8s-graceful-leave",
        Flaw::K8sShutdownKeepsLease,
        "left gracefully",
    );
    assert!(v.starts_with("t=") && v.contains("failover:"), "{v}");
}

#[test]
fn removed_is_final_fires_on_a_kubernetes_member_that_recreates_its_deleted_lease() {
    let v = first_failure("k8s-lease-expiry", Flaw::K8sRecreateSameId, "listed again");
    assert!(v.contains("new incarnation"), "{v}");
    let v = first_failure(
        "k8s-everyone-lease-expiry",
        Flaw::K8sRecreateSameId,
        "listed again",
    );
    assert!(v.contains("new incarnation"), "{v}");
}

#[test]
fn liveness_fires_on_a_kubernetes_watch_that_does_not_relist_after_410() {
    let v = first_failure_within("k8s-lease-expiry", Flaw::K8s410NotRelisted, "liveness:", 12);
    assert!(v.contains("not converged"), "{v}");
}

#[test]
fn lease_oracle_fires_on_a_restarted_kubernetes_member_that_keeps_its_ghost() {
    let v = first_failure(
        "k8s-rolling-update",
        Flaw::K8sGhostKept,
        "started at its address",
    );
    assert!(v.contains("still listed"), "{v}");
}

/// A slice change that does not wake the reconciler leaves a crashed Pod's member listed after
/// its endpoint went not ready, until its Lease expires.
#[test]
fn gating_oracle_fires_on_a_kubernetes_provider_that_ignores_slice_changes() {
    let v = first_failure(
        "k8s-member-crash",
        Flaw::K8sSliceChangeIgnored,
        "endpoints:",
    );
    assert!(v.contains("went NotReady"), "{v}");
}

/// An endpoint that is terminating but still serving (the Pod's preStop hook) must not be
/// listed: peers are to stop routing to it before its process stops.
#[test]
fn gating_oracle_fires_on_a_kubernetes_provider_that_lists_terminating_endpoints() {
    let v = first_failure(
        "k8s-graceful-leave",
        Flaw::K8sTerminatingServed,
        "endpoints:",
    );
    assert!(v.contains("went Terminating"), "{v}");
}

/// A Kubernetes member that counts a failed renewal as one never learns that it lost its
/// Lease while cut off: peers delete it while it still serves as a member.
#[test]
fn self_awareness_fires_on_a_kubernetes_member_that_counts_failed_renewals() {
    let v = first_failure(
        "k8s-lease-expiry",
        Flaw::K8sRenewedOnAttempt,
        "had not announced MembershipLost",
    );
    assert!(v.contains("the API server expired"), "{v}");
}

/// A Kubernetes member that ignores a 429's Retry-After comes back after its usual backoff, well
/// before the wait the API server asked for: the door flags it.
#[test]
fn pushback_checker_fires_on_a_kubernetes_member_that_ignores_retry_after() {
    let v = first_failure(
        "k8s-apf-saturation",
        Flaw::K8sIgnoresRetryAfter,
        "429 that said Retry-After",
    );
    assert!(v.contains("apiserver:"), "{v}");
}

/// Sharded heartbeats: a member watches several shards' heartbeats; a 429 to one of its
/// watches that holds back only that watch lets the others go on reading the saturated API
/// server.
#[test]
fn pushback_checker_fires_on_a_member_whose_other_watches_ignore_a_429() {
    let v = first_failure(
        "k8s-apf-saturation",
        Flaw::K8sRetryAfterPerWatch,
        "429 that said Retry-After",
    );
    assert!(v.contains("read leases again"), "{v}");
}

#[test]
fn lease_oracle_fires_on_a_restarted_etcd_member_that_keeps_its_ghost() {
    let v = first_failure(
        "etcd-rolling-restart",
        Flaw::EtcdGhostKept,
        "after it accepted its leave",
    );
    assert!(v.contains("the etcd still lists"), "{v}");
}

#[test]
fn removed_is_final_fires_on_an_etcd_member_that_rejoins_under_its_old_id() {
    let v = first_failure("etcd-partition", Flaw::EtcdRejoinSameId, "listed again");
    assert!(v.contains("new incarnation"), "{v}");
}

#[test]
fn liveness_fires_on_an_etcd_watch_that_retries_a_compacted_revision() {
    let v = first_failure(
        "etcd-partition",
        Flaw::EtcdCompactedNotRelisted,
        "liveness:",
    );
    assert!(v.contains("not converged"), "{v}");
}

#[test]
fn self_awareness_fires_on_an_etcd_member_that_counts_failed_keep_alives() {
    let v = first_failure(
        "etcd-partition",
        Flaw::EtcdRenewedOnAttempt,
        "had not announced MembershipLost",
    );
    assert!(v.contains("the etcd expired"), "{v}");
}

#[test]
fn failover_and_history_fire_on_an_etcd_view_that_ignores_deletes() {
    let v = first_failure("etcd-member-crash", Flaw::EtcdDeleteIgnored, "failover:");
    assert!(v.contains("still lists"), "{v}");
    let h = first_failure_within("etcd-partition", Flaw::EtcdDeleteIgnored, "history:", 12);
    assert!(
        h.contains("never issued") || h.contains("but the registry issued"),
        "{h}"
    );
}

/// A keep-alive dated when its late answer came, not when it was sent: the member is cut off
/// from etcd right after, believes in its lease past etcd's expiry, and keeps identities its
/// peers take over.
#[test]
fn single_activation_fires_on_an_etcd_keep_alive_dated_on_its_answer() {
    let v = first_failure_within(
        "etcd-timing",
        Flaw::EtcdKeepAliveDatedOnAnswer,
        "single activation",
        20,
    );
    assert!(v.contains("has held it active"), "{v}");
}

/// A keep-alive round that waits a whole interval after a slow answer: renewals drift apart
/// until the member's own reckoning lapses, though etcd holds its lease and its path is fine.
#[test]
fn false_loss_fires_on_an_etcd_keep_alive_loop_that_waits_after_each_answer() {
    let v = first_failure_within(
        "etcd-timing",
        Flaw::RenewAfterAnswer,
        "announced MembershipLost although",
        20,
    );
    assert!(v.contains("still holds its registration"), "{v}");
}

/// The same wait in the Kubernetes provider's renew loop: a live member whose answers come
/// late gives up its membership although its Lease stands.
#[test]
fn false_loss_fires_on_a_kubernetes_renew_loop_that_waits_after_each_answer() {
    let v = first_failure_within(
        "k8s-timing",
        Flaw::RenewAfterAnswer,
        "announced MembershipLost although",
        20,
    );
    assert!(v.contains("the API server still holds"), "{v}");
}

/// A member that judges its own key gone from a view that has not reached its own write (a
/// lagging watch right after it registered again) gives up a live membership, again and again.
#[test]
fn false_loss_fires_on_an_etcd_member_that_judges_its_key_from_a_lagging_view() {
    let v = first_failure_within(
        "etcd-timing",
        Flaw::EtcdOwnKeyJudgedEarly,
        "announced MembershipLost although",
        20,
    );
    assert!(v.contains("healthy for"), "{v}");
}

/// Keep-alives every TTL instead of every third of it: healthy, connected members expire.
#[test]
fn no_false_expiry_fires_on_an_etcd_member_that_keeps_alive_too_seldom() {
    let v = first_failure(
        "etcd-member-crash",
        Flaw::EtcdKeepAliveEveryTtl,
        "although its path",
    );
    assert!(v.contains("must never expire"), "{v}");
}

/// A member that keeps its actors after losing its lease: peers take its identities over while
/// it still holds them.
#[test]
fn single_activation_checker_fires_on_actors_kept_after_a_lost_membership() {
    let v = first_failure(
        "partition-heal",
        Flaw::ActorsKeptOnLost,
        "single activation:",
    );
    assert!(
        v.contains("while") && v.contains("has held it active"),
        "{v}"
    );
}

/// The same broken hand-off seen from a caller: after a registry restart the node re-joined
/// as a new incarnation but still serves the identity as the one from before it left.
#[test]
fn stale_routing_checker_fires_on_actors_kept_after_a_lost_membership() {
    // Seeds 12, 48 and 53 of 1-60 since watches keep one idle timer (2026-12-07).
    let v = failure_in_seeds(
        "registry-restart",
        &[12, 48, 53],
        Flaw::ActorsKeptOnLost,
        "no stale routing:",
    );
    assert!(v.contains("rendezvous"), "{v}");
}

/// A release answered when the identity starts draining instead of once it is gone: the new
/// owner activates while the old one still holds it (a call in flight, or its `deactivate`
/// not yet run). The interval oracle sees it in a few seeds of most scenarios with moves
/// (graceful-leave seed 2 on 2026-12-06; since admission is decided at once, seeds 15, 17 and
/// 25 of 1-40).
#[test]
fn single_activation_checker_fires_on_a_release_answered_before_the_drain() {
    let v = first_failure_within(
        "graceful-leave",
        Flaw::ReleaseBeforeDrained,
        "single activation:",
        30,
    );
    assert!(v.contains("activated") && v.contains("while"), "{v}");
}

/// The drain deadline deactivates an identity with a call still running in it (the call is
/// forgotten, not cancelled): judged over the call's interval, not at its start (network
/// seed 8 on 2026-12-06: one call in 40 outlasts the drain; since admission is decided at once,
/// seeds 15, 26 and 28 of 1-40).
#[test]
fn interval_checker_fires_on_calls_that_outlive_the_drain() {
    let v = first_failure_within("network", Flaw::CallsOutliveDrain, "single activation:", 30);
    assert!(v.contains("call(s) still ran"), "{v}");
}

/// A hand-off that takes the first state any member kept, whatever its generation: an old
/// copy wins over the newest state and the identity rolls back (describe seed 4 on
/// 2026-12-06).
#[test]
fn state_continuity_checker_fires_on_a_hand_off_that_ignores_generations() {
    let v = first_failure("describe", Flaw::HandoffAnyState, "state continuity:");
    assert!(v.contains("rolled back"), "{v}");
}

/// A claimant that reads an answer as the incarnation it asked, not the one that answered: a
/// holder that lost its membership and re-joined as a new incarnation answers "nothing kept"
/// for the old one, which then reads as "that incarnation never activated it", and a copy it
/// had superseded comes back (found as k8s-sharded-lease-expiry seed 72 on 2026-12-07 with
/// topologies coalesced over 50 ms; since watches keep one idle timer, k8s-sharded-renewal-loss
/// seeds 1548, 2216 and 2303: 5 of 2,500; since the partition service starts before the join,
/// seeds 412, 734 and 1115: 9 of 3,000).
#[test]
fn state_continuity_checker_fires_on_answers_read_as_the_incarnation_asked() {
    let v = failure_in_seeds(
        "k8s-sharded-renewal-loss",
        &[412, 734, 1115],
        Flaw::ReleaseAnswerAsAsked,
        "state continuity:",
    );
    assert!(v.contains("rolled back"), "{v}");
}

/// A host that runs calls to one activation concurrently although its kind did not opt in.
#[test]
fn turn_checker_fires_on_a_host_that_runs_calls_concurrently() {
    let v = first_failure("steady", Flaw::TurnsIgnored, "one call at a time:");
    assert!(v.contains("while"), "{v}");
}

#[test]
fn minimal_movement_checker_fires_on_draining_everything_on_every_change() {
    let v = first_failure("member-crash", Flaw::DrainOnAnyChange, "minimal movement:");
    assert!(v.contains("still names it as the owner"), "{v}");
}

#[test]
fn availability_checker_fires_on_a_claim_never_dropped_after_a_failed_release_round() {
    let v = first_failure("member-crash", Flaw::ClaimNotDropped, "availability:");
    assert!(v.contains("after convergence"), "{v}");
}

/// A renewal published as a change reaches every watcher on every heartbeat: a quadratic
/// fan-out that no correctness oracle sees (every message is a true topology), caught by the
/// load budget in every seed, at five members.
#[test]
fn load_budget_fires_on_a_registry_that_publishes_every_heartbeat() {
    for name in ["steady", "member-crash"] {
        for seed in 1..=3 {
            let r = run(name, seed, Flaw::HeartbeatPublishes);
            let v = r
                .recording
                .violations
                .iter()
                .find(|v| v.contains("load budget"))
                .unwrap_or_else(|| panic!("{name} seed {seed}: {:?}", r.recording.violations));
            assert!(v.contains("watch messages"), "{v}");
        }
    }
}

/// A view that takes a progress notification at its own revision for a store that went back
/// relists on every notification: a relist storm, caught by the load budget in every seed.
#[test]
fn load_budget_fires_on_an_etcd_view_that_relists_on_every_progress_notification() {
    for seed in 1..=3 {
        let r = run("etcd-member-crash", seed, Flaw::EtcdProgressRelists);
        assert!(
            r.recording
                .violations
                .iter()
                .any(|v| v.contains("load budget")),
            "seed {seed}: {:?}",
            r.recording.violations
        );
    }
}

fn run_knobs(
    name: &str,
    seed: u64,
    flaw: Flaw,
    adjust: impl Fn(&mut shoal_sim::knobs::Knobs),
) -> SeedReport {
    let s = scenario::by_name(name).unwrap_or_else(|| panic!("no scenario {name}"));
    let mut knobs = s.knobs_for(seed);
    adjust(&mut knobs);
    run_seed_isolated(
        &s,
        seed,
        &RunOptions {
            flaw,
            knobs: Some(knobs),
            ..RunOptions::default()
        },
    )
}

/// The registry never sends an update across a gap, so the client's gap check is code no
/// in-contract seed runs: with the door dropping updates (out-of-contract seeds), a client that
/// applies an update on whatever it holds ends up with a topology the registry never issued.
#[test]
fn history_oracle_fires_on_a_client_that_ignores_gaps_once_the_door_drops_updates() {
    let caught = (1..=20).find(|&seed| {
        run_knobs("partition-heal", seed, Flaw::UpdateGapIgnored, |k| {
            k.out_of_contract = true
        })
        .recording
        .violations
        .iter()
        .any(|v| v.contains("history:"))
    });
    let seed = caught.expect("the history oracle fires in some seed");
    let quiet = run_knobs("partition-heal", seed, Flaw::UpdateGapIgnored, |k| {
        k.out_of_contract = false
    });
    assert!(
        quiet.passed(),
        "without out-of-contract messages the flaw is never reached: {:?}",
        quiet.recording.violations
    );
}

/// A subscriber that falls behind and is not told so misses topology changes silently: the
/// event-stream oracle sees the chain of reports break.
#[test]
fn event_stream_oracle_fires_on_lag_that_is_not_reported() {
    let v = first_failure_within("swarm", Flaw::LagUnreported, "events:", 40);
    assert!(v.contains("dropped silently"), "{v}");
}

/// Sharded heartbeats: a monitor that deletes an expired heartbeat without its resource
/// version as the precondition deletes one renewed after it looked, and removes a live member
/// (the same planted line as for one Lease per member, in the monitors' cleaner).
#[test]
fn lease_oracle_fires_on_sharded_monitors_that_delete_without_a_precondition() {
    let v = failure_in_seeds(
        "k8s-sharded-renewal-loss",
        &[11, 272],
        Flaw::K8sCleanWithoutPrecondition,
        "lease:",
    );
    assert!(v.contains("was expired"), "{v}");
    // The same with the default settings (32 shards, 3 monitors).
    let v = failure_in_seeds(
        "k8s-network",
        &[59, 106],
        Flaw::K8sCleanWithoutPrecondition,
        "lease:",
    );
    assert!(v.contains("was expired"), "{v}");
}

/// Sharded heartbeats at 100 members: a monitor that watches every heartbeat (the shard
/// label left out of its selector) brings back the N² fan-out, which only the load budget
/// sees; the same seed without the flaw stays within it, with events per member per second
/// flat between 25 and 100 members.
#[test]
fn load_budget_fires_on_sharded_monitors_that_watch_every_heartbeat() {
    let s = scenario::by_name("k8s-sharded-member-crash")
        .unwrap()
        .with_members(100)
        .unwrap();
    let opts = |flaw| RunOptions {
        keep_trace: false,
        flaw,
        schedule: None,
        knobs: None,
    };
    let bad = run_seed_isolated(&s, 1, &opts(Flaw::K8sHeartbeatsUnsharded));
    assert!(
        bad.recording
            .violations
            .iter()
            .any(|v| v.contains("load budget") && v.contains("watch messages")),
        "{:?}",
        bad.recording.violations
    );
    let good = run_seed_isolated(&s, 1, &opts(Flaw::None));
    assert!(
        good.recording.violations.is_empty(),
        "{:?}",
        good.recording.violations
    );
    let small = scenario::by_name("k8s-sharded-member-crash")
        .unwrap()
        .with_members(25)
        .unwrap();
    let small = run_seed_isolated(&small, 1, &opts(Flaw::None));
    let per_member = |r: &SeedReport| {
        r.load
            .as_ref()
            .expect("load measured")
            .events_per_member_per_s
    };
    assert!(
        per_member(&good) < per_member(&small) * 1.5,
        "events per member per second grew with the cluster: {} at 25, {} at 100",
        per_member(&small),
        per_member(&good)
    );
}

/// Each node's activation is built by `ActivationNode` and its partition service answers
/// before the provider starts, so no peer lists a member it cannot ask to let go: at 200
/// Kubernetes members this seed costs 0.6 release rounds of 199 asks per activation (claims
/// of the join wave ask fewer members). With the service started after the join (as the
/// harness did until 2026-12-08), the same seed took 3.4 rounds per activation (5.9 over
/// seeds 1-2), the rounds of the join wave failing on members that did not answer yet.
#[test]
fn release_rounds_do_not_fail_on_members_whose_service_is_not_up_yet() {
    let s = scenario::by_name("k8s-member-crash")
        .unwrap()
        .with_members(200)
        .unwrap();
    let opts = RunOptions {
        keep_trace: false,
        flaw: Flaw::None,
        schedule: None,
        knobs: None,
    };
    let r = run_seed_isolated(&s, 1, &opts);
    assert!(r.passed(), "{:?}", r.recording.violations);
    let path = |p: &str| r.recording.paths.get(p).copied().unwrap_or(0);
    let activations = path("activation: activations");
    let asked = path("activation: sent release requests");
    assert!(activations > 0);
    let rounds = asked as f64 / (activations * (r.members as u64 - 1)) as f64;
    assert!(
        rounds < 2.0,
        "{rounds:.1} release rounds per activation ({asked} requests, {activations} activations, {} refused as unreachable)",
        path("activation: release not granted (unreachable)")
    );
}

/// A create of a member's Lease whose answer was lost may have been applied; a peer that found
/// that Lease expired deleted it. Sending the create again under the same id brings back an id
/// the API server removed (found by the campaign in `k8s-timing` seed 143: answers late, then a
/// cut from the API server past the Lease); the provider reads the Lease first and, if it is
/// gone, takes a new id.
#[test]
fn removed_is_final_fires_on_a_kubernetes_create_in_doubt_sent_again() {
    let v = failure_in_seeds(
        "k8s-everyone-timing",
        &[194],
        Flaw::K8sCreateInDoubtRepeated,
        "listed again",
    );
    assert!(v.contains("new incarnation"), "{v}");
}

/// A cluster migrating to sharded heartbeats: a member with sharded heartbeats that never
/// touches its record while members that renew their own Lease are listed is found expired
/// by them a record duration after they first saw it, though it renews its heartbeat.
#[test]
fn lease_oracle_fires_on_a_migrating_member_that_never_touches_its_record() {
    let v = failure_in_seeds(
        "k8s-migrate-to-sharded",
        &[5, 6],
        Flaw::K8sRecordUntouched,
        "lease:",
    );
    assert!(v.contains("expired"), "{v}");
}

/// A cluster migrating between heartbeat settings: members with sharded heartbeats that do
/// not age unmarked records leave a dead member of the other setting listed once none of its
/// own kind is left to remove it.
#[test]
fn lease_oracle_fires_on_members_that_do_not_age_the_other_settings_leases() {
    let v = failure_in_seeds(
        "k8s-migrate-to-everyone",
        &[2, 9],
        Flaw::K8sUnmarkedUnaged,
        "is still listed",
    );
    assert!(v.contains("could reach the API server"), "{v}");
}

/// A cluster migrating between heartbeat settings: members that renew their own Lease
/// counted as monitors leave the shards they would monitor with nobody to remove their dead.
#[test]
fn lease_oracle_fires_on_monitors_chosen_among_members_that_watch_no_heartbeats() {
    let v = failure_in_seeds(
        "k8s-migrate-to-sharded",
        &[11, 29],
        Flaw::K8sUnmarkedMonitors,
        "is still listed",
    );
    assert!(v.contains("could reach the API server"), "{v}");
}

/// Sharded heartbeats with zones: monitors chosen by weight alone can both be in the zone cut
/// off, leaving that zone's members of their shard listed though a monitor the design spreads
/// to another zone could have removed them.
#[test]
fn lease_oracle_fires_on_monitors_chosen_without_regard_to_zones() {
    let v = failure_in_seeds(
        "k8s-sharded-zone-outage",
        &[28, 45],
        Flaw::K8sMonitorsIgnoreZones,
        "is still listed",
    );
    assert!(v.contains("could reach the API server"), "{v}");
}

/// Sharded heartbeats: a monitor that deleted an expired member's heartbeat and died before it
/// deleted the record; the next monitor that ages the record a whole Lease duration from then
/// (instead of removing it after the cleaners' short delay) keeps the member listed past the
/// bound.
#[test]
fn lease_oracle_fires_on_a_record_left_behind_by_a_dead_remover_aged_again() {
    let v = failure_in_seeds(
        "k8s-migrate-to-everyone",
        // 1 seed in 6,000 (1047 before the partition service started before the join).
        &[5823],
        Flaw::K8sOrphanRecordAged,
        "is still listed",
    );
    assert!(v.contains("could reach the API server"), "{v}");
}

/// etcd restored from a snapshot taken before a member's last description: the member keeps
/// its lease and its key, with the old value, and must write it again.
#[test]
fn liveness_fires_on_an_etcd_member_that_keeps_its_key_as_a_restore_left_it() {
    let v = first_failure("etcd-restore", Flaw::EtcdStaleKeyKept, "liveness:");
    assert!(v.contains("its process describes itself as"), "{v}");
}

/// A restore whose later writes reached a member's revision with as many keys there: only the
/// point read of the view's latest write tells the histories apart.
#[test]
fn history_fires_on_an_etcd_audit_that_only_counts_keys() {
    let v = failure_in_seeds(
        "etcd-restore",
        &[21, 34, 60],
        Flaw::EtcdAuditCountOnly,
        "history:",
    );
    assert!(v.contains("never issued"), "{v}");
}

/// A client that does not authenticate again when etcd refuses its token (the token's TTL
/// passed, etcd restarted, the auth store changed) loses its lease while its path is fine: the
/// re-authentication is the shared endpoint policy's, planted there.
#[test]
fn lease_fires_on_an_etcd_client_that_never_renews_its_token() {
    let v = first_failure_within(
        "etcd-auth-expiry",
        Flaw::EtcdTokenNotRenewed,
        "a live, connected member must keep its membership",
        3,
    );
    assert!(v.contains("MembershipLost"), "{v}");
}

/// A client that stays on an etcd member its calls get no answer from (frozen, while the
/// other two keep the quorum) loses its lease: moving off an abandoned endpoint is the shared
/// endpoint policy's, planted there.
#[test]
fn lease_fires_on_an_etcd_client_that_stays_on_a_frozen_member() {
    let v = first_failure_within(
        "etcd-member-freeze",
        Flaw::EtcdAbandonedCallStays,
        "a live, connected member must keep its membership",
        3,
    );
    assert!(v.contains("MembershipLost"), "{v}");
}
