//! # shoal-sim
//!
//! Deterministic simulation of Shoal clusters on [madsim]: every member is a simulated node with
//! its own IP running the real provider and partition manager, faults are injected from a seed,
//! and checkers verify that membership and placement stay correct.
//!
//! Everything here needs the simulated build (`RUSTFLAGS="--cfg madsim"`); in a normal build the
//! crate only carries the command-line shell, which explains how to build it.
//!
//! [madsim]: https://docs.rs/madsim

#[cfg(madsim)]
pub mod demo;
