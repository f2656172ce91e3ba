//! Activation: which virtual-actor identities this node has active, and under which fence.
//!
//! Membership exists so that each identity is active on exactly one member. [`Activations`] is
//! the per-node bookkeeping of that, as a state machine with no I/O: a request activates an
//! identity only on the member its topology names as owner; a request carrying a fence older
//! than the one the identity was activated under is refused (a caller routing with a topology
//! from before the identity moved); a rebalance that moves identities away drains them (no new
//! work, in-flight work finishes within a bounded time) before they are deactivated; a member
//! told it lost its membership deactivates everything at once, before peers can take over.
//!
//! [`IdentityLookup`] finds an identity's owner and the fence to call it with
//! ([`PlacementLookup`]: every node computes it from its own topology); [`drive`] keeps a node's
//! [`Activations`] in step with its membership events.
//!
//! Not yet (issue 10): the remote call path between members, state hand-off to the new owner,
//! and the simulator's activation workload with its checkers (single activation, no stale
//! routing, minimal movement, availability).

mod lookup;
mod registry;

pub use lookup::{IdentityLookup, Located, PlacementLookup, drive};
pub use registry::{Activation, Activations, Decision, Fence, Phase, Refusal};
