//! Placement benchmarks: owner lookup against the naive rendezvous scan, and the cost of a
//! topology change with many remembered identities. Figures are quoted in docs/placement.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use shoal::placement::{PlacementTable, naive_owner};
use shoal::{ClusterTopology, Member, MemberId, PartitionConfig, PartitionManager};

fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| {
            Member::new(
                MemberId::parse(format!("member-{i:05}")).unwrap(),
                format!("10.{}.{}.{}:4000", i / 65536, (i / 256) % 256, i % 256),
                ["user", "order"],
            )
        })
        .collect()
}

fn topo(version: u64, members: Vec<Member>) -> Arc<ClusterTopology> {
    Arc::new(ClusterTopology::new("bench", version, members).unwrap())
}

fn lookup(c: &mut Criterion) {
    let ids: Vec<String> = (0..4096).map(|i| format!("user-{i}")).collect();
    let mut group = c.benchmark_group("owner_lookup");
    for n in [10usize, 100, 1000] {
        let t = topo(1, members(n));
        let table = PlacementTable::new(&t);
        let pm = PartitionManager::new("bench", PartitionConfig::default());
        pm.update_topology(t.clone()).unwrap();
        for id in &ids {
            pm.owner("user", id);
        }
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("naive_scan", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(naive_owner(&t, "user", &ids[i]).map(|m| m.id.clone()))
            })
        });
        group.bench_with_input(BenchmarkId::new("table_scan", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(table.owner("user", &ids[i]))
            })
        });
        group.bench_with_input(
            BenchmarkId::new("partition_manager_cached", n),
            &n,
            |b, _| {
                b.iter(|| {
                    i = (i + 1) & 4095;
                    black_box(pm.owner("user", &ids[i]))
                })
            },
        );
    }
    group.finish();
}

fn update(c: &mut Criterion) {
    const MEMBERS: usize = 1000;
    const IDENTITIES: usize = 100_000;
    let base = members(MEMBERS + 1);
    let without_last: Vec<Member> = base[..MEMBERS].to_vec();
    let mut group = c.benchmark_group("update_topology_1000_members_100k_identities");
    group.sample_size(10);
    // Build a manager holding 100k remembered identities at version 1 (1000 members).
    let fresh = || {
        let pm = PartitionManager::new("bench", PartitionConfig::default());
        pm.update_topology(topo(1, without_last.clone())).unwrap();
        for i in 0..IDENTITIES {
            pm.owner("user", &format!("user-{i}"));
        }
        pm
    };
    let joined = topo(2, base.clone());
    let mut left_members = without_last.clone();
    left_members.remove(MEMBERS / 2);
    let left = topo(2, left_members);
    group.bench_function("one_member_joins", |b| {
        b.iter_batched(
            fresh,
            |pm| {
                let moved = pm.update_topology(joined.clone()).unwrap().moved.len();
                (pm, black_box(moved))
            },
            criterion::BatchSize::PerIteration,
        )
    });
    group.bench_function("one_member_leaves", |b| {
        b.iter_batched(
            fresh,
            |pm| {
                let moved = pm.update_topology(left.clone()).unwrap().moved.len();
                (pm, black_box(moved))
            },
            criterion::BatchSize::PerIteration,
        )
    });
    // Baseline: recompute every remembered identity from scratch with the naive scan.
    let ids: Vec<String> = (0..IDENTITIES).map(|i| format!("user-{i}")).collect();
    group.bench_function("baseline_naive_recompute_all", |b| {
        b.iter(|| {
            let mut owned = 0usize;
            for id in &ids {
                owned += naive_owner(&joined, "user", id).is_some() as usize;
            }
            black_box(owned)
        })
    });
    group.finish();
}

criterion_group!(benches, lookup, update);
criterion_main!(benches);
