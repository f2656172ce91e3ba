//! # shoal-sim
//!
//! Deterministic simulation of Shoal clusters on [madsim]: every member is a simulated node with
//! its own IP running the real provider, partition manager and (skewable) clock; faults are
//! injected from a seed; checkers verify that membership and placement stay correct.
//!
//! * [`cluster::SimCluster`]: build a cluster (provider, members, clients, registry) and apply
//!   [`faults::Fault`]s to it.
//! * [`faults::FaultSchedule`]: faults as data; [`scenario`] draws one per seed.
//! * [`check`]: safety (sampled while faults run) and liveness (after they heal).
//! * [`record::Recorder`]: trace with simulated timestamps and a digest per seed.
//! * [`campaign`]: many seeds in parallel, summarised; [`timeline`]: an SVG of one run.
//! * [`flaw`]: deliberately broken providers that prove every checker fires.
//!
//! Everything here needs the simulated build (`RUSTFLAGS="--cfg madsim"`); see
//! docs/simulation.md.
//!
//! [madsim]: https://docs.rs/madsim

#[cfg(madsim)]
pub mod bench;
#[cfg(madsim)]
pub mod campaign;
#[cfg(madsim)]
pub mod check;
#[cfg(madsim)]
pub mod cluster;
#[cfg(madsim)]
pub mod faults;
#[cfg(madsim)]
pub mod flaw;
#[cfg(madsim)]
pub mod prop;
#[cfg(madsim)]
pub mod record;
#[cfg(madsim)]
pub mod scenario;
#[cfg(madsim)]
pub mod timeline;
#[cfg(madsim)]
pub mod wallclock;
