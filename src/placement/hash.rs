//! The fixed placement hash.
//!
//! Every node must compute the same owner for an identity on every platform and every Rust
//! version, so placement never uses `std`'s hashers (whose algorithm and keys are unspecified).
//! The hash is spelled out here and pinned by golden values in the tests:
//!
//! * `key_hash(kind, identity)` and `member_hash(address)`: 64-bit FNV-1a over the UTF-8 bytes,
//!   each field preceded by its length as a little-endian `u64` (so `("ab","c")` and `("a","bc")`
//!   differ), a domain byte first (`b'K'` for keys, `b'M'` for members), then the MurmurHash3
//!   `fmix64` finalizer.
//! * `zone_hash(zone)`: the same over the zone name, with domain byte `b'Z'` (zone-affinity
//!   placement elects a key's home zone by rendezvous over the zones, then its owner in it).
//! * `weight(key, member) = fmix64(key + member * 0x9E3779B97F4A7C15)` (wrapping arithmetic).
//!   The multiply-add keeps weights of different (key, member) pairs uncorrelated, which an XOR
//!   would not.
//!
//! The owner of a key is the member with the highest weight; equal weights go to the member
//! with the smallest id.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The MurmurHash3 64-bit finalizer: a bijection that spreads every input bit over the output.
pub const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new(domain: u8) -> Self {
        Fnv(FNV_OFFSET).bytes(&[domain])
    }

    fn bytes(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
        self
    }

    fn field(self, text: &str) -> Self {
        self.bytes(&(text.len() as u64).to_le_bytes())
            .bytes(text.as_bytes())
    }

    fn finish(self) -> u64 {
        fmix64(self.0)
    }
}

/// Hash of a placement key: one virtual-actor identity of one kind.
pub fn key_hash(kind: &str, identity: &str) -> u64 {
    Fnv::new(b'K').field(kind).field(identity).finish()
}

/// Hash of a member's placement key (its address).
pub fn member_hash(address: &str) -> u64 {
    Fnv::new(b'M').field(address).finish()
}

/// Hash of a zone name, for electing a key's home zone (zone-affinity placement).
pub fn zone_hash(zone: &str) -> u64 {
    Fnv::new(b'Z').field(zone).finish()
}

/// Rendezvous weight of `member` for `key`; the highest weight owns the key.
#[inline]
pub fn weight(key: u64, member: u64) -> u64 {
    fmix64(key.wrapping_add(member.wrapping_mul(GOLDEN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These values are the placement contract: if one changes, identities move between
    /// members of a mixed-version cluster. Never update them without a migration note. They
    /// were computed by an independent implementation of the specification above (Python).
    #[test]
    fn golden_values() {
        let k = key_hash("user", "alice");
        let m = member_hash("10.0.0.1:4000");
        assert_eq!(k, 0x292d_01c8_5c39_b46f);
        assert_eq!(m, 0x1b05_a012_4759_bc72);
        assert_eq!(weight(1, 2), 0xe850_28e6_b31f_8e7a);
        assert_eq!(weight(k, m), 0x1868_c1b5_c64c_2a7d);
        assert_eq!(zone_hash("eu-west-1a"), 0x4ced_6bb2_3b74_b185);
        assert_eq!(zone_hash(""), 0xe88c_ff1f_ca4e_af9e);
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
    }

    #[test]
    fn fields_are_length_prefixed() {
        assert_ne!(key_hash("ab", "c"), key_hash("a", "bc"));
        assert_ne!(key_hash("", "x"), member_hash("x"));
    }
}
