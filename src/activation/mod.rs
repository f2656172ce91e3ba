//! Activation: each virtual-actor identity active on exactly one member, and calls that find it.
//!
//! Membership exists so that each identity is active on exactly one member. The pieces:
//!
//! * [`Activations`], the per-node bookkeeping as a state machine with no I/O: a request
//!   activates an identity only on the member its topology names as owner, and only after
//!   every other member confirmed it let go of it (a *claim*); a request carrying a fence older
//!   than the one the identity is active under is refused; a rebalance that moves identities
//!   away drains them (no new work, in-flight work finishes within a bounded time); a member
//!   told it lost its membership deactivates everything at once.
//! * [`ActivationHost`], its async shell on a node that hosts actors: serves calls, asks the
//!   other members to let go before activating ([`Transport::release`]), answers their
//!   requests, hands actor state over, and follows the node's membership events.
//! * [`IdentityLookup`] finds an identity's owner and the fence to call it with
//!   ([`PlacementLookup`]: every node computes it from its own topology, through the partition
//!   manager's owner cache, which each topology change rebalances).
//! * [`ActivationClient`] calls an identity from any node, retrying what a fresher view or a
//!   moment fixes; [`GrpcTransport`] carries calls and releases over `shoal.partition.v1`.
//! * [`ActivationNode`] wires the pieces in one place ([`ActivationNode::builder`]: kinds
//!   registered with their own factories, or one [`Actors`]) and starts and stops them in the
//!   order the protocol needs.
//!
//! The guarantees and their timing assumptions are in `docs/activation.md`.

mod client;
pub(crate) mod grpc;
pub mod handoff;
mod host;
mod kinds;
mod lookup;
mod metrics;
mod node;
mod registry;

pub use client::{ActivationClient, Attempt, Called, ClientConfig};
pub use grpc::{GrpcTransport, REFUSAL_HEADER};
pub use host::{
    ActivationConfig, ActivationHost, ActorError, Actors, CallError, CallReply, Deactivation,
    RefusalCode, Released, Transport,
};
pub use kinds::{Actor, ActorKind, Kinds};
pub use lookup::{IdentityLookup, Located, PlacementLookup};
pub use metrics::{ActivationMetrics, ReasonLabel};
pub use node::{ActivationBuilder, ActivationNode, BuildError};
pub use registry::{
    Activation, Activations, Closed, Decision, Fence, Grant, Phase, Refusal, Release,
};

/// Largest call payload, in bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Longest kind or identity, in bytes.
pub const MAX_NAME: usize = 256;
