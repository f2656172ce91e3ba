//! The cluster model: members, topologies and the differences between them.

mod member;
mod topology;

pub(crate) use member::check_text;
pub use member::{Description, Member, MemberId, MemberLimits};
pub use topology::{ClusterTopology, MemberChange, TopologyDiff};

/// Why a member, id or topology description was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Not a DNS label of at most 63 characters.
    #[error(
        "invalid member id {0:?}: expected 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
    )]
    InvalidMemberId(String),
    /// An address that is not `host:port` with a port in 1..=65535.
    #[error(
        "invalid address {0:?}: expected host:port with a port in 1..=65535 (IPv6 hosts in brackets)"
    )]
    InvalidAddress(String),
    /// A required name was empty.
    #[error("{field} must not be empty")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// A name or value was longer than its limit.
    #[error("{field} is {len} bytes long, the limit is {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A list had more entries than its limit.
    #[error("{count} {field} given, the limit is {max}")]
    TooMany {
        /// The field.
        field: &'static str,
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A name contained a control character.
    #[error("{field} contains a control character")]
    ControlCharacter {
        /// The field.
        field: &'static str,
    },
    /// Two members of one topology had the same id.
    #[error("member {0} appears twice in one topology")]
    DuplicateMember(MemberId),
}
