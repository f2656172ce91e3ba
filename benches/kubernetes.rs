//! The Kubernetes provider's reconcile: what one Lease event and one relist cost a node of a
//! 1,000-member cluster (with a Service of 1,000 endpoints), incrementally (`MemberIndex`, as
//! the provider runs) against a naive rebuild from every Lease (`members`), in the same run.
//! Figures are quoted in docs/providers/kubernetes.md.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use shoal::kubernetes::api::{Endpoint, EndpointSlice, Lease, ObjectReference};
use shoal::kubernetes::members::{
    METADATA_PREFIX, MemberIndex, member_lease, members, serving_pods,
};
use shoal::{Member, MemberId};
use std::time::Duration;

const N: usize = 1000;

fn pod(i: usize) -> ObjectReference {
    ObjectReference {
        kind: "Pod".into(),
        namespace: "ns".into(),
        name: format!("pod-{i:05}"),
        uid: format!("uid-{i}"),
    }
}

fn leases(n: usize) -> Vec<Lease> {
    (0..n)
        .map(|i| {
            let mut m = Member::new(
                MemberId::parse(format!("member-{i:05}")).unwrap(),
                format!("10.0.{}.{}:4000", i / 250, i % 250),
                ["user", "order"],
            );
            m.metadata.insert("rack".into(), format!("r{}", i % 16));
            let mut l = member_lease("shop", "ns", &m, Duration::from_secs(15), 1, Some(pod(i)));
            l.meta.resource_version = i.to_string();
            l
        })
        .collect()
}

/// One Service of `n` serving endpoints, 100 per slice (the controller's default).
fn slices(n: usize) -> Vec<EndpointSlice> {
    (0..n)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| EndpointSlice {
            endpoints: chunk
                .iter()
                .map(|i| Endpoint {
                    addresses: vec![format!("10.0.{}.{}", i / 250, i % 250)],
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                    zone: Some(format!("z{}", i % 3)),
                    target_ref: Some(pod(*i)),
                })
                .collect(),
            ..EndpointSlice::default()
        })
        .collect()
}

fn reconcile(c: &mut Criterion) {
    let leases = leases(N);
    let slices = slices(N);
    let serving = serving_pods(&slices);
    let mut group = c.benchmark_group("kubernetes_reconcile");
    // A renewal: only renewTime changes.
    let mut renewed = leases[N / 2].clone();
    renewed.renew_time_micros = Some(2);
    let mut index = MemberIndex::new("shop");
    index.replace_all(&leases);
    group.bench_with_input(BenchmarkId::new("renewal_naive", N), &N, |b, _| {
        b.iter(|| {
            let serving = serving_pods(black_box(&slices));
            black_box(members("shop", black_box(&leases), Some(&serving)))
        })
    });
    group.bench_with_input(BenchmarkId::new("renewal_incremental", N), &N, |b, _| {
        b.iter(|| black_box(index.upsert(black_box(&renewed))))
    });
    // A description change: the member list is rebuilt from the index (no parsing).
    let mut described = [leases[N / 2].clone(), leases[N / 2].clone()];
    described[1]
        .meta
        .annotations
        .insert(format!("{METADATA_PREFIX}rack"), "r99".into());
    let mut k = 0;
    group.bench_with_input(BenchmarkId::new("change_naive", N), &N, |b, _| {
        b.iter(|| black_box(members("shop", black_box(&leases), Some(&serving))))
    });
    group.bench_with_input(BenchmarkId::new("change_incremental", N), &N, |b, _| {
        b.iter(|| {
            k ^= 1;
            assert!(index.upsert(&described[k]));
            black_box(index.listed(Some(&serving)))
        })
    });
    // A relist (after 410 Gone) that finds the same Leases, renewed.
    let relisted: Vec<Lease> = leases
        .iter()
        .map(|l| {
            let mut l = l.clone();
            l.renew_time_micros = Some(3);
            l
        })
        .collect();
    group.bench_with_input(BenchmarkId::new("relist_naive", N), &N, |b, _| {
        b.iter(|| black_box(members("shop", black_box(&relisted), Some(&serving))))
    });
    group.bench_with_input(BenchmarkId::new("relist_incremental", N), &N, |b, _| {
        b.iter(|| {
            let changed = index.replace_all(black_box(&relisted));
            black_box((changed, index.listed(Some(&serving))))
        })
    });
    group.finish();
}

criterion_group!(benches, reconcile);
criterion_main!(benches);
