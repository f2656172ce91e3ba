//! Property tests for placement: agreement, minimal movement and uniformity.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use shoal::placement::{PlacementTable, naive_owner};
use shoal::{ClusterTopology, Member, MemberId, PartitionConfig, PartitionManager};

const KINDS: [&str; 3] = ["a", "b", "c"];

/// Members with distinct ids and addresses, each hosting a non-empty subset of KINDS.
fn members(max: usize) -> impl Strategy<Value = Vec<Member>> {
    prop::collection::btree_map(0u32..10_000, 1u8..8, 1..max).prop_map(|m| {
        m.into_iter()
            .map(|(n, mask)| {
                let kinds: Vec<&str> = KINDS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, k)| *k)
                    .collect();
                Member::new(
                    MemberId::parse(format!("m{n}")).unwrap(),
                    format!("10.1.{}.{}:7000", n / 256, n % 256),
                    kinds,
                )
            })
            .collect()
    })
}

fn identities() -> impl Strategy<Value = Vec<(usize, String)>> {
    prop::collection::vec((0..KINDS.len(), "[a-z0-9]{1,12}"), 1..200)
}

fn topo(version: u64, members: impl IntoIterator<Item = Member>) -> Arc<ClusterTopology> {
    Arc::new(ClusterTopology::new("c", version, members).unwrap())
}

fn owner_id(pm: &PartitionManager, kind: &str, id: &str) -> Option<MemberId> {
    pm.owner(kind, id).map(|m| m.id.clone())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A node that learned the members one by one, in any order, agrees with a node that got
    /// them all at once, and with the plain rendezvous scan.
    #[test]
    fn every_node_agrees_whatever_the_member_order(
        ms in members(40),
        ids in identities(),
        order in any::<prop::sample::Index>(),
        rotate in any::<usize>(),
    ) {
        let all = topo(1_000, ms.clone());
        let at_once = PartitionManager::new("c", PartitionConfig::default());
        at_once.update_topology(all.clone()).unwrap();

        let incremental = PartitionManager::new("c", PartitionConfig::default());
        let mut shuffled = ms.clone();
        let len = shuffled.len();
        shuffled.rotate_left(rotate % len);
        shuffled.swap(0, order.index(len));
        // Look some identities up before the topology is complete, so the cache is rebalanced.
        for (v, n) in (1..=shuffled.len()).enumerate() {
            incremental.update_topology(topo(v as u64 + 1, shuffled[..n].iter().cloned())).unwrap();
            for (k, id) in ids.iter().take(v * 5) {
                incremental.owner(KINDS[*k], id);
            }
        }
        let table = PlacementTable::new(&all);
        for (k, id) in &ids {
            let kind = KINDS[*k];
            let expected = naive_owner(&all, kind, id).map(|m| m.id.clone());
            prop_assert_eq!(owner_id(&at_once, kind, id), expected.clone());
            prop_assert_eq!(owner_id(&incremental, kind, id), expected.clone());
            prop_assert_eq!(table.owner(kind, id).map(|m| m.id.clone()), expected);
        }
    }

    /// Removing a member moves exactly the identities it owned, and nothing else.
    #[test]
    fn removing_a_member_moves_only_what_it_owned(ms in members(40), ids in identities(), pick in any::<prop::sample::Index>()) {
        let pm = PartitionManager::new("c", PartitionConfig::default());
        pm.update_topology(topo(1, ms.clone())).unwrap();
        let before: Vec<_> = ids.iter().map(|(k, id)| owner_id(&pm, KINDS[*k], id)).collect();
        let gone = ms[pick.index(ms.len())].id.clone();
        let report = pm.update_topology(topo(2, ms.iter().filter(|m| m.id != gone).cloned())).unwrap();
        for m in &report.moved {
            prop_assert_eq!(m.from.as_ref(), Some(&gone));
        }
        for ((k, id), was) in ids.iter().zip(&before) {
            let now = owner_id(&pm, KINDS[*k], id);
            if was.as_ref() == Some(&gone) {
                prop_assert_ne!(now.as_ref(), Some(&gone));
                prop_assert!(report.moved.iter().any(|m| &m.identity == id && m.kind == KINDS[*k]));
            } else {
                prop_assert_eq!(&now, was);
            }
        }
    }

    /// Adding a member moves only identities the new member now owns.
    #[test]
    fn adding_a_member_moves_only_to_it(ms in members(40), ids in identities(), kinds in 1u8..8) {
        let pm = PartitionManager::new("c", PartitionConfig::default());
        pm.update_topology(topo(1, ms.clone())).unwrap();
        let before: Vec<_> = ids.iter().map(|(k, id)| owner_id(&pm, KINDS[*k], id)).collect();
        let kinds: Vec<&str> = KINDS.iter().enumerate().filter(|(i, _)| kinds & (1 << i) != 0).map(|(_, k)| *k).collect();
        let newcomer = Member::new(MemberId::parse("new").unwrap(), "10.9.9.9:7000", kinds);
        let mut grown = ms.clone();
        grown.push(newcomer.clone());
        let report = pm.update_topology(topo(2, grown)).unwrap();
        for m in &report.moved {
            prop_assert_eq!(m.to.as_ref(), Some(&newcomer.id));
        }
        for ((k, id), was) in ids.iter().zip(&before) {
            let now = owner_id(&pm, KINDS[*k], id);
            if now != *was {
                prop_assert_eq!(now.as_ref(), Some(&newcomer.id));
            }
        }
    }

    /// Over 10,000 identities each member's share is within five binomial standard deviations of
    /// an equal share (about +-15% at 10 members, +-30% at 40).
    #[test]
    fn distribution_is_close_to_uniform(n in 2usize..40, base in 0u32..100_000) {
        let ms: Vec<Member> = (0..n as u32)
            .map(|i| Member::new(MemberId::parse(format!("m{}", base + i)).unwrap(), format!("host-{}.svc:80", base + i), ["a"]))
            .collect();
        let t = topo(1, ms);
        let table = PlacementTable::new(&t);
        let mut counts: BTreeMap<MemberId, u32> = BTreeMap::new();
        const IDS: u32 = 10_000;
        for i in 0..IDS {
            *counts.entry(table.owner("a", &format!("actor-{i}")).unwrap().id.clone()).or_default() += 1;
        }
        prop_assert_eq!(counts.len(), n, "every member owns something");
        let p = 1.0 / n as f64;
        let mean = IDS as f64 * p;
        let sd = (IDS as f64 * p * (1.0 - p)).sqrt();
        for (id, c) in counts {
            prop_assert!((c as f64 - mean).abs() <= 5.0 * sd, "{} owns {} of {}, expected {:.0} +- {:.0}", id, c, IDS, mean, 5.0 * sd);
        }
    }
}

#[test]
fn ties_and_duplicate_addresses_resolve_to_the_smallest_id_on_every_node() {
    // Two members at the same address have equal weights for every key.
    let a = Member::new(MemberId::parse("b-older").unwrap(), "10.0.0.1:1", ["k"]);
    let b = Member::new(MemberId::parse("a-newer").unwrap(), "10.0.0.1:1", ["k"]);
    for members in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
        let t = topo(1, members);
        for i in 0..100 {
            assert_eq!(
                naive_owner(&t, "k", &i.to_string()).unwrap().id.as_str(),
                "a-newer"
            );
        }
    }
}

// Zone affinity (`PlacementRule::ZoneAffinity`).

const ZONES: [&str; 4] = ["z1", "z2", "z3", ""];

/// Members spread over up to four zones (one of them "no zone").
fn zoned_members(max: usize) -> impl Strategy<Value = Vec<Member>> {
    (members(max), prop::collection::vec(0..ZONES.len(), 40)).prop_map(|(ms, zones)| {
        ms.into_iter()
            .enumerate()
            .map(|(i, mut m)| {
                let z = ZONES[zones[i % zones.len()]];
                m.zone = (!z.is_empty()).then(|| z.to_string());
                m
            })
            .collect()
    })
}

fn zoned() -> PartitionConfig {
    PartitionConfig {
        rule: shoal::placement::PlacementRule::ZoneAffinity,
        ..PartitionConfig::default()
    }
}

fn zone_owner_id(t: &ClusterTopology, kind: &str, id: &str) -> Option<MemberId> {
    shoal::placement::naive_zone_owner(t, kind, id).map(|m| m.id.clone())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every node computes the same owner (the manager, with its cache, through any sequence
    /// of topologies, equals the plain scan over the current one), and the owner is in the
    /// key's home zone: one of the zones that host the kind.
    #[test]
    fn zone_affinity_agrees_with_the_plain_scan_through_changes(
        first in zoned_members(30),
        second in zoned_members(30),
        ids in identities(),
    ) {
        let pm = PartitionManager::new("c", zoned());
        for (v, ms) in [(1, first.clone()), (2, second.clone()), (3, first)] {
            let t = topo(v, ms);
            let report = pm.update_topology(t.clone()).unwrap();
            for (k, id) in &ids {
                let kind = KINDS[*k];
                let want = zone_owner_id(&t, kind, id);
                prop_assert_eq!(owner_id(&pm, kind, id), want.clone());
                // Reported moves are exactly the remembered identities whose owner changed.
                if let Some(m) = report.moved.iter().find(|m| m.kind == kind && m.identity == *id) {
                    prop_assert_eq!(&m.to, &want);
                }
            }
            let table = PlacementTable::with_rule(&t, shoal::placement::PlacementRule::ZoneAffinity);
            for (k, id) in &ids {
                let kind = KINDS[*k];
                prop_assert_eq!(table.owner(kind, id).map(|m| m.id.clone()), zone_owner_id(&t, kind, id));
            }
        }
    }

    /// A zone outage moves only the identities homed in that zone; a member leaving a zone
    /// that keeps others moves only its own identities, and they stay in its zone.
    #[test]
    fn zone_affinity_moves_the_minimum(ms in zoned_members(40), ids in identities(), pick in any::<prop::sample::Index>()) {
        let before = topo(1, ms.clone());
        let zone_of = |t: &ClusterTopology, m: &MemberId| t.member(m).and_then(|m| m.zone.clone());
        // Zone outage.
        let lost = ms[pick.index(ms.len())].zone.clone();
        let after = topo(2, ms.iter().filter(|m| m.zone != lost).cloned());
        for (k, id) in &ids {
            let kind = KINDS[*k];
            let (b, a) = (zone_owner_id(&before, kind, id), zone_owner_id(&after, kind, id));
            if let Some(b) = &b && zone_of(&before, b) != lost {
                prop_assert_eq!(Some(b.clone()), a, "{}/{} moved though its zone stayed", kind, id);
            }
        }
        // One member leaves.
        let gone = ms[pick.index(ms.len())].id.clone();
        let after = topo(2, ms.iter().filter(|m| m.id != gone).cloned());
        for (k, id) in &ids {
            let kind = KINDS[*k];
            let (b, a) = (zone_owner_id(&before, kind, id), zone_owner_id(&after, kind, id));
            match &b {
                Some(b) if *b == gone => {
                    let zone = zone_of(&before, b);
                    let zone_left = after.members().iter().any(|m| m.zone == zone && m.hosts(kind));
                    if zone_left {
                        prop_assert_eq!(zone_of(&after, a.as_ref().unwrap()), zone, "{}/{} left its zone", kind, id);
                    }
                }
                _ => prop_assert_eq!(b, a, "{}/{} moved though its owner stayed", kind, id),
            }
        }
    }
}
