//! # shoal-sim
//!
//! Deterministic simulation of Shoal clusters on [madsim]: every member is a simulated node with
//! its own IP running the real provider, partition manager and (skewable) clock; faults are
//! injected from a seed; checkers verify that membership and placement stay correct.
//!
//! * [`cluster::SimCluster`]: build a cluster (provider, members, clients) and apply
//!   [`faults::Fault`]s to it.
//! * [`control`]: the simulated control planes (registry, Kubernetes API server, etcd, in
//!   memory), one module each behind one trait; [`load`]: what each serves, and its budget.
//! * [`faults::FaultSchedule`]: faults as data; [`scenario`] draws one per seed.
//! * [`oracle`]: judges fed with what the harness observed (accepted requests, sent watch
//!   messages, applied views, faults in force), checked on every observation.
//! * [`check`]: agreement (sampled while faults run) and liveness (after they heal).
//! * [`workload`]: owner lookups on every node, checked against a fresh computation.
//! * [`knobs`]: what a seed varies besides faults (packet loss, latency, buggify, buffer sizes).
//! * [`record::Recorder`]: trace with simulated timestamps and a digest per seed.
//! * [`campaign`]: many seeds in parallel, summarised; [`merge`]: shards' summaries combined;
//!   [`timeline`]: an SVG of one run.
//! * [`flaw`]: deliberately broken providers that prove every checker fires.
//!
//! Everything here needs the simulated build (`RUSTFLAGS="--cfg madsim"`); see
//! docs/simulation.md.
//!
//! [madsim]: https://docs.rs/madsim

#[cfg(madsim)]
pub mod activation;
#[cfg(madsim)]
pub mod bench;
#[cfg(madsim)]
pub mod campaign;
#[cfg(madsim)]
pub mod check;
#[cfg(madsim)]
pub mod cluster;
#[cfg(madsim)]
pub mod control;
#[cfg(madsim)]
pub mod failover;
#[cfg(madsim)]
pub mod faults;
#[cfg(madsim)]
pub mod fingerprint;
#[cfg(madsim)]
pub mod flaw;
#[cfg(madsim)]
pub mod health;
#[cfg(madsim)]
pub mod knobs;
#[cfg(madsim)]
pub mod links;
#[cfg(madsim)]
pub mod load;
#[cfg(madsim)]
pub mod merge;
#[cfg(madsim)]
pub mod oracle;
#[cfg(madsim)]
pub mod prop;
#[cfg(madsim)]
pub mod record;
#[cfg(madsim)]
pub mod scale;
#[cfg(madsim)]
pub mod scenario;
#[cfg(madsim)]
pub mod timeline;
#[cfg(madsim)]
pub mod wallclock;
#[cfg(madsim)]
pub mod workload;
