//! Members and their incarnation-unique identifiers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ModelError;
use crate::runtime::{Clock, unix_millis};

/// Identifies one *incarnation* of a member process.
///
/// A restarted process gets a new id, so anything still tied to the old incarnation (a stale
/// watch stream, an unexpired lease, a late leave request) can never remove its successor.
/// The text is a DNS label (lowercase letters, digits and `-`, at most 63 characters), so the same
/// id can name a Kubernetes Lease or an etcd key without escaping. Ids order by their text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MemberId(Arc<str>);

impl MemberId {
    /// Longest accepted id, in bytes (a DNS label).
    pub const MAX_LEN: usize = 63;

    /// Parses and validates an id received from the outside (wire, CLI, a Lease name).
    pub fn parse(text: impl AsRef<str>) -> Result<Self, ModelError> {
        let text = text.as_ref();
        let valid_chars = text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if text.is_empty()
            || text.len() > Self::MAX_LEN
            || !valid_chars
            || text.starts_with('-')
            || text.ends_with('-')
        {
            return Err(ModelError::InvalidMemberId(truncate_for_error(text)));
        }
        Ok(Self(Arc::from(text)))
    }

    /// A fresh id for a new incarnation of node `name`: `{name}-{wall ms hex}-{random hex}`.
    ///
    /// The wall-clock part makes a restarted node's id sort after its predecessor's on a sane
    /// clock; the random part makes two starts in the same millisecond distinct. `name` is
    /// reduced to its DNS-label characters and cut to 32 bytes.
    pub fn generate(name: &str, clock: &dyn Clock) -> Self {
        let mut prefix: String = name
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(32)
            .collect();
        while prefix.ends_with('-') {
            prefix.pop();
        }
        let prefix = prefix.trim_start_matches('-');
        let prefix = if prefix.is_empty() { "member" } else { prefix };
        let random = clock.random_u64() as u32;
        let text = format!("{prefix}-{:x}-{random:08x}", unix_millis(clock));
        Self(Arc::from(text))
    }

    /// A fresh id for the next incarnation of the same node, after this one was removed: the
    /// node-name part of a [`Self::generate`]d id is kept (the whole id otherwise).
    pub fn successor(&self, clock: &dyn Clock) -> Self {
        let mut parts = self.0.rsplitn(3, '-');
        let (random, wall, name) = (parts.next(), parts.next(), parts.next());
        let hex = |p: Option<&str>| {
            p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        let name = match name {
            Some(name) if hex(random) && hex(wall) => name,
            _ => &self.0,
        };
        loop {
            let next = Self::generate(name, clock);
            if next != *self {
                return next;
            }
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn truncate_for_error(text: &str) -> String {
    text.chars().take(80).collect()
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemberId({})", self.0)
    }
}

impl TryFrom<String> for MemberId {
    type Error = ModelError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<MemberId> for String {
    fn from(value: MemberId) -> Self {
        value.0.to_string()
    }
}

impl std::str::FromStr for MemberId {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Size limits for member descriptions, shared by every provider and the registry server so
/// that bad input is rejected the same way everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberLimits {
    /// Longest address, in bytes.
    pub max_address_len: usize,
    /// Most kinds one member may host.
    pub max_kinds: usize,
    /// Longest kind name, zone or metadata key, in bytes.
    pub max_name_len: usize,
    /// Most metadata entries.
    pub max_metadata_entries: usize,
    /// Longest metadata value, in bytes.
    pub max_metadata_value_len: usize,
}

impl Default for MemberLimits {
    fn default() -> Self {
        Self {
            max_address_len: 255,
            max_kinds: 64,
            max_name_len: 128,
            max_metadata_entries: 32,
            max_metadata_value_len: 1024,
        }
    }
}

/// The part of a member's description that may change while it runs, without it becoming a new
/// incarnation: a node that drains a kind before it stops, a label an operator sets, a zone
/// learnt after start. The id and address never change (a new address is a new process: a new
/// incarnation), so placement stays stable for identities of kinds the member keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    /// Actor kinds the member hosts.
    pub kinds: BTreeSet<String>,
    /// Failure domain, if known.
    pub zone: Option<String>,
    /// Free-form labels.
    pub metadata: BTreeMap<String, String>,
}

/// One member of a cluster as every other node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Incarnation-unique id.
    pub id: MemberId,
    /// Where the member's actors and partition manager are reached (`host:port`). Placement
    /// hashes this, so a restarted node at the same address gets its identities back.
    pub address: String,
    /// Actor kinds this member hosts, sorted.
    pub kinds: BTreeSet<String>,
    /// Failure domain (availability zone), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Free-form labels, sorted by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl Member {
    /// A member with no zone and no metadata.
    pub fn new<I, S>(id: MemberId, address: impl Into<String>, kinds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            id,
            address: address.into(),
            kinds: kinds.into_iter().map(Into::into).collect(),
            zone: None,
            metadata: BTreeMap::new(),
        }
    }

    /// Sets the zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// What this member says about itself besides its id and address.
    pub fn description(&self) -> Description {
        Description {
            kinds: self.kinds.clone(),
            zone: self.zone.clone(),
            metadata: self.metadata.clone(),
        }
    }

    /// This member with `description` in place of its own (same id and address).
    pub fn described(mut self, description: Description) -> Self {
        self.kinds = description.kinds;
        self.zone = description.zone;
        self.metadata = description.metadata;
        self
    }

    /// Whether this member hosts actors of `kind`.
    pub fn hosts(&self, kind: &str) -> bool {
        self.kinds.contains(kind)
    }

    /// Checks the description against `limits`, naming the offending field.
    pub fn validate(&self, limits: &MemberLimits) -> Result<(), ModelError> {
        check_text("address", &self.address, limits.max_address_len)?;
        check_address(&self.address)?;
        if self.kinds.len() > limits.max_kinds {
            return Err(ModelError::TooMany {
                field: "kinds",
                count: self.kinds.len(),
                max: limits.max_kinds,
            });
        }
        for kind in &self.kinds {
            check_text("kind", kind, limits.max_name_len)?;
        }
        if let Some(zone) = &self.zone {
            check_text("zone", zone, limits.max_name_len)?;
        }
        if self.metadata.len() > limits.max_metadata_entries {
            return Err(ModelError::TooMany {
                field: "metadata",
                count: self.metadata.len(),
                max: limits.max_metadata_entries,
            });
        }
        for (key, value) in &self.metadata {
            check_text("metadata key", key, limits.max_name_len)?;
            if value.len() > limits.max_metadata_value_len {
                return Err(ModelError::TooLong {
                    field: "metadata value",
                    len: value.len(),
                    max: limits.max_metadata_value_len,
                });
            }
        }
        Ok(())
    }
}

/// Names (cluster names, kinds, zones, addresses): non-empty, bounded, no control characters.
/// Checks that `address` is `host:port`: a non-empty host (IPv6 in brackets) without spaces, and
/// a decimal port in 1..=65535. Peers dial this address, so a typo must fail at join time, not
/// later on every call routed to the member.
pub(crate) fn check_address(address: &str) -> Result<(), ModelError> {
    let bad = || ModelError::InvalidAddress(address.to_string());
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65_535).contains(&p));
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && !host.contains(':')
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        }
    };
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

pub(crate) fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), ModelError> {
    if text.is_empty() {
        return Err(ModelError::Empty { field });
    }
    if text.len() > max {
        return Err(ModelError::TooLong {
            field,
            len: text.len(),
            max,
        });
    }
    if text.chars().any(|c| c.is_control()) {
        return Err(ModelError::ControlCharacter { field });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_be_host_and_port() {
        for ok in [
            "10.0.0.1:4000",
            "node-1.svc.cluster.local:80",
            "[::1]:65535",
            "h:1",
        ] {
            assert!(check_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "no-port",
            "host:",
            ":80",
            "host:0",
            "host:99999",
            "host:+80",
            "host:80a",
            "::1:80",
            "[::1:80",
            "[nope]:80",
            "a b:80",
            "host:00000080",
        ] {
            let err = check_address(bad).unwrap_err();
            assert!(err.to_string().contains("host:port"), "{bad}: {err}");
        }
    }

    #[test]
    fn member_id_validation() {
        assert!(MemberId::parse("node-1-18c2f-0badcafe").is_ok());
        for bad in ["", "-a", "a-", "Upper", "a_b", "a b", &"x".repeat(64)] {
            assert!(MemberId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn generated_ids_are_valid_and_distinct() {
        let clock = crate::runtime::TokioClock;
        let a = MemberId::generate("Node_A.example:8080", &clock);
        let b = MemberId::generate("Node_A.example:8080", &clock);
        assert_ne!(a, b);
        assert!(MemberId::parse(a.as_str()).is_ok(), "{a}");
        assert!(a.as_str().starts_with("node-a-example-8080-"), "{a}");
        let c = MemberId::generate("---", &clock);
        assert!(c.as_str().starts_with("member-"), "{c}");
        let long = MemberId::generate(&"z".repeat(200), &clock);
        assert!(long.as_str().len() <= MemberId::MAX_LEN);
    }

    #[test]
    fn member_validation_names_the_field() {
        let id = MemberId::parse("m1").unwrap();
        let limits = MemberLimits::default();
        let ok = Member::new(id.clone(), "127.0.0.1:1", ["a"]);
        assert!(ok.validate(&limits).is_ok());
        let err = Member::new(id.clone(), "", ["a"])
            .validate(&limits)
            .unwrap_err();
        assert!(err.to_string().contains("address"), "{err}");
        let many: Vec<String> = (0..65).map(|i| format!("k{i}")).collect();
        let err = Member::new(id.clone(), "a:1", many)
            .validate(&limits)
            .unwrap_err();
        assert!(err.to_string().contains("kinds"), "{err}");
        let err = Member::new(id, "a:1", ["bad\nkind"])
            .validate(&limits)
            .unwrap_err();
        assert!(err.to_string().contains("kind"), "{err}");
    }

    #[test]
    fn member_id_serde_rejects_invalid() {
        let ok: MemberId = serde_json::from_str("\"abc-1\"").unwrap();
        assert_eq!(ok.as_str(), "abc-1");
        assert!(serde_json::from_str::<MemberId>("\"ABC\"").is_err());
    }
}
