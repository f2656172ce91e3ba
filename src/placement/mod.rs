//! Placement of virtual-actor identities on members: rendezvous hashing with a fixed hash.

pub mod hash;
mod manager;
mod table;

pub use manager::{Moved, PartitionConfig, PartitionManager, PlacementError, RebalanceReport};
pub use table::{PlacementRule, PlacementTable, naive_owner, naive_zone_owner};
