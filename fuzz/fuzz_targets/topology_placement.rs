//! Fuzzes topology construction, diffs and placement over arbitrary member sets:
//! - building a topology never panics (duplicates are an error, not a crash);
//! - `old.diff(new).apply(old) == new`, and the diff of a topology with itself is empty;
//! - the partition manager's incremental rebalance agrees with the plain rendezvous scan, and
//!   every identity it reports as moved really changed owner.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shoal::placement::naive_owner;
use shoal::{ClusterTopology, Member, MemberId, PartitionConfig, PartitionManager};

#[derive(Arbitrary, Debug)]
struct FuzzMember {
    id: u8,
    address: u8,
    kinds: u8,
    zone: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    before: Vec<FuzzMember>,
    after: Vec<FuzzMember>,
    identities: Vec<(u8, u16)>,
    cache: u8,
}

const KINDS: [&str; 4] = ["a", "b", "c", "d"];

fn member(m: &FuzzMember) -> Member {
    let kinds = KINDS.iter().enumerate().filter(|(i, _)| m.kinds & (1 << i) != 0).map(|(_, k)| *k);
    let mut member = Member::new(
        MemberId::parse(format!("m{}", m.id)).expect("valid id"),
        format!("10.0.0.{}:1", m.address % 8),
        kinds,
    );
    if let Some(z) = m.zone {
        member = member.with_zone(format!("z{}", z % 3));
    }
    member
}

fn topology(version: u64, ms: &[FuzzMember]) -> Option<ClusterTopology> {
    ClusterTopology::new("fuzz", version, ms.iter().map(member)).ok()
}

fuzz_target!(|input: Input| {
    let (Some(old), Some(new)) = (topology(1, &input.before), topology(2, &input.after)) else {
        return;
    };
    let diff = old.diff(&new);
    assert!(diff.apply(old.members()).iter().eq(new.members().iter().map(|m| &**m)));
    assert!(new.diff(&new).is_empty());

    let pm = PartitionManager::new("fuzz", PartitionConfig { max_cached_identities: input.cache as usize, ..PartitionConfig::default() });
    pm.update_topology(Arc::new(old.clone())).expect("newer");
    let ids: Vec<(&str, String)> =
        input.identities.iter().map(|(k, i)| (KINDS[*k as usize % 4], i.to_string())).collect();
    for (kind, id) in &ids {
        let got = pm.owner(kind, id).map(|m| m.id.clone());
        assert_eq!(got, naive_owner(&old, kind, id).map(|m| m.id.clone()));
    }
    let report = pm.update_topology(Arc::new(new.clone())).expect("newer");
    for m in &report.moved {
        assert_ne!(m.from, m.to);
        assert_eq!(m.from, naive_owner(&old, &m.kind, &m.identity).map(|x| x.id.clone()));
        assert_eq!(m.to, naive_owner(&new, &m.kind, &m.identity).map(|x| x.id.clone()));
    }
    for (kind, id) in &ids {
        let got = pm.owner(kind, id).map(|m| m.id.clone());
        assert_eq!(got, naive_owner(&new, kind, id).map(|m| m.id.clone()));
    }
});
