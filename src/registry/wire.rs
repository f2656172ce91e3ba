//! Conversions between the model and the registry protocol, and error-to-status mapping.

use std::sync::Arc;

use tonic::{Code, Status};

use super::pb;
use super::state::{Change, RegistryError};
use crate::cluster::{ClusterTopology, Member, MemberId, ModelError};
use crate::runtime::sim;

/// A protocol member as a model member (the id is validated; limits are checked by the caller).
pub fn member_from_pb(m: pb::Member) -> Result<Member, ModelError> {
    Ok(Member {
        id: MemberId::parse(&m.id)?,
        address: m.address,
        kinds: m.kinds.into_iter().collect(),
        zone: (!m.zone.is_empty()).then_some(m.zone),
        metadata: m.metadata,
    })
}

/// A model member as a protocol member.
pub fn member_to_pb(m: &Member) -> pb::Member {
    pb::Member {
        id: m.id.to_string(),
        address: m.address.clone(),
        kinds: m.kinds.iter().cloned().collect(),
        zone: m.zone.clone().unwrap_or_default(),
        metadata: m.metadata.clone(),
    }
}

/// The members of `t` as a `MemberList`.
pub fn pb_list(t: &ClusterTopology) -> pb::MemberList {
    pb::MemberList {
        members: t.members().iter().map(|m| member_to_pb(m)).collect(),
    }
}

/// The members of `t` encoded as a `MemberList`, to be shared by every watcher of that version.
pub fn pack_members(t: &ClusterTopology) -> prost::bytes::Bytes {
    prost::Message::encode_to_vec(&pb_list(t)).into()
}

/// A snapshot's members encoded once and shared by every watcher of that version: the bytes of
/// `Snapshot.packed_members` and their encoding (cheap to clone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedMembers {
    /// How `bytes` is encoded.
    pub encoding: pb::MembersEncoding,
    /// An encoded `MemberList`, compressed when `encoding` says so.
    pub bytes: prost::bytes::Bytes,
}

impl PackedMembers {
    /// Plain (uncompressed) packed members.
    pub fn plain(bytes: prost::bytes::Bytes) -> Self {
        Self {
            encoding: pb::MembersEncoding::Plain,
            bytes,
        }
    }

    /// These members compressed (`MEMBERS_ENCODING_ZLIB`, fast level), or `None` when that
    /// does not make them smaller. `self` must be plain.
    pub fn compressed(&self) -> Option<Self> {
        use std::io::Write;
        debug_assert_eq!(self.encoding, pb::MembersEncoding::Plain);
        let mut z = flate2::write::ZlibEncoder::new(
            Vec::with_capacity(self.bytes.len() / 2),
            flate2::Compression::fast(),
        );
        z.write_all(&self.bytes).ok()?;
        let zlib = z.finish().ok()?;
        (zlib.len() < self.bytes.len()).then(|| Self {
            encoding: pb::MembersEncoding::Zlib,
            bytes: zlib.into(),
        })
    }
}

/// A full-topology watch message carrying already packed plain members (cheap to clone).
pub fn snapshot_packed(epoch: u64, version: u64, packed: prost::bytes::Bytes) -> pb::WatchResponse {
    snapshot_encoded(epoch, version, PackedMembers::plain(packed))
}

/// A full-topology watch message carrying already packed members in any encoding.
pub fn snapshot_encoded(epoch: u64, version: u64, packed: PackedMembers) -> pb::WatchResponse {
    pb::WatchResponse {
        event: Some(pb::watch_response::Event::Snapshot(pb::Snapshot {
            version,
            epoch,
            members: Vec::new(),
            packed_members: packed.bytes,
            fragment: false,
            encoding: packed.encoding as i32,
        })),
    }
}

/// One fragment of a snapshot's packed members (`piece` of members encoded as `encoding`);
/// `more` when others follow.
pub fn snapshot_fragment(
    epoch: u64,
    version: u64,
    encoding: pb::MembersEncoding,
    piece: prost::bytes::Bytes,
    more: bool,
) -> pb::WatchResponse {
    let mut msg = snapshot_encoded(
        epoch,
        version,
        PackedMembers {
            encoding,
            bytes: piece,
        },
    );
    if let Some(pb::watch_response::Event::Snapshot(s)) = &mut msg.event {
        s.fragment = more;
    }
    msg
}

/// Reassembles snapshots that arrive in fragments (`Snapshot.fragment`): every other message
/// passes through unchanged; the fragments of one snapshot are held (at most `limit` bytes) and
/// come out as one whole snapshot when the last arrives.
#[derive(Debug)]
pub struct SnapshotAssembler {
    limit: usize,
    /// (epoch, version, encoding, the packed members so far) of the snapshot being reassembled.
    held: Option<(u64, u64, i32, Vec<u8>)>,
}

impl SnapshotAssembler {
    /// Holds at most `limit` bytes of one snapshot.
    pub fn new(limit: usize) -> Self {
        Self { limit, held: None }
    }

    /// Whether fragments of a snapshot are held, waiting for the rest.
    pub fn is_partial(&self) -> bool {
        self.held.is_some()
    }

    /// The next whole message, if `msg` completes one.
    pub fn feed(
        &mut self,
        msg: pb::WatchResponse,
    ) -> Result<Option<pb::WatchResponse>, WatchApplyError> {
        let Some(pb::watch_response::Event::Snapshot(s)) = &msg.event else {
            if self.held.is_some() {
                return Err(WatchApplyError::Malformed(
                    "a snapshot's fragments were interrupted by another message".into(),
                ));
            }
            return Ok(Some(msg));
        };
        if !s.fragment && self.held.is_none() {
            return Ok(Some(msg));
        }
        if !s.members.is_empty() {
            return Err(WatchApplyError::Malformed(
                "a snapshot fragment carries inline members".into(),
            ));
        }
        let (epoch, version, encoding) = (s.epoch, s.version, s.encoding);
        let (e, v, enc, buf) = self
            .held
            .get_or_insert_with(|| (epoch, version, encoding, Vec::new()));
        if (*e, *v) != (epoch, version) {
            return Err(WatchApplyError::Malformed(format!(
                "a fragment of version {version} (epoch {epoch:x}) inside the snapshot of version {v} (epoch {e:x})"
            )));
        }
        if *enc != encoding {
            return Err(WatchApplyError::Malformed(format!(
                "a fragment in encoding {encoding} inside a snapshot in encoding {enc}"
            )));
        }
        if buf.len() + s.packed_members.len() > self.limit {
            return Err(WatchApplyError::Malformed(format!(
                "a fragmented snapshot exceeds {} bytes",
                self.limit
            )));
        }
        buf.extend_from_slice(&s.packed_members);
        if s.fragment {
            return Ok(None);
        }
        let (epoch, version, encoding, buf) = self.held.take().expect("held above");
        Ok(Some(pb::WatchResponse {
            event: Some(pb::watch_response::Event::Snapshot(pb::Snapshot {
                version,
                epoch,
                packed_members: buf.into(),
                // As received: an unknown encoding is refused when the members are read.
                encoding,
                ..Default::default()
            })),
        }))
    }
}

/// A full-topology watch message.
pub fn snapshot(t: &ClusterTopology) -> pb::WatchResponse {
    snapshot_packed(t.epoch(), t.version(), pack_members(t))
}

/// The members of a snapshot message, whether inline or packed (in any encoding; a compressed
/// list may expand to at most [`super::MAX_DECODE_BYTES`]).
pub fn snapshot_members(s: pb::Snapshot) -> Result<Vec<pb::Member>, WatchApplyError> {
    if s.packed_members.is_empty() {
        return Ok(s.members);
    }
    let packed = match pb::MembersEncoding::try_from(s.encoding) {
        Ok(pb::MembersEncoding::Plain) => s.packed_members,
        Ok(pb::MembersEncoding::Zlib) => {
            decompress_members(&s.packed_members, super::MAX_DECODE_BYTES)?.into()
        }
        Err(_) => {
            return Err(WatchApplyError::Malformed(format!(
                "packed members in unknown encoding {}",
                s.encoding
            )));
        }
    };
    let list: pb::MemberList = prost::Message::decode(packed)
        .map_err(|e| WatchApplyError::Malformed(format!("packed members: {e}")))?;
    let mut members = s.members;
    members.extend(list.members);
    Ok(members)
}

/// Compressed packed members (`MEMBERS_ENCODING_ZLIB`) expanded: refused when they would
/// expand beyond `limit` bytes (found out before more is allocated), are cut short (no
/// checksummed end), or have bytes after their end.
fn decompress_members(data: &[u8], limit: usize) -> Result<Vec<u8>, WatchApplyError> {
    let bad = |why: String| WatchApplyError::Malformed(format!("compressed packed members: {why}"));
    let mut z = flate2::Decompress::new(true);
    let mut out: Vec<u8> = Vec::new();
    loop {
        if out.len() == out.capacity() {
            if out.len() >= limit {
                return Err(bad(format!("they expand beyond {limit} bytes")));
            }
            let more = out
                .len()
                .max(data.len() * 2)
                .max(4096)
                .min(limit - out.len());
            out.reserve_exact(more);
        }
        let (read, wrote) = (z.total_in(), out.len());
        let input = data.get(read as usize..).unwrap_or_default();
        let status = z
            .decompress_vec(input, &mut out, flate2::FlushDecompress::None)
            .map_err(|e| bad(e.to_string()))?;
        if status == flate2::Status::StreamEnd {
            break;
        }
        if z.total_in() == read && out.len() == wrote && out.len() < out.capacity() {
            return Err(bad("they are cut short".into()));
        }
    }
    if out.len() > limit {
        return Err(bad(format!("they expand beyond {limit} bytes")));
    }
    if z.total_in() as usize != data.len() {
        return Err(bad(format!(
            "{} bytes follow their end",
            data.len() - z.total_in() as usize
        )));
    }
    Ok(out)
}

/// An incremental watch message.
pub fn update(c: &Change) -> pb::WatchResponse {
    pb::WatchResponse {
        event: Some(pb::watch_response::Event::Update(pb::Update {
            version: c.topology.version(),
            epoch: c.topology.epoch(),
            previous_version: c.previous_version,
            joined: c.joined.iter().map(member_to_pb).collect(),
            left: c.left.iter().map(|m| m.id.to_string()).collect(),
            changed: if sim::flaw("update-omits-changed") {
                Vec::new()
            } else {
                c.changed.iter().map(member_to_pb).collect()
            },
        })),
    }
}

/// A keep-alive watch message.
pub fn progress(epoch: u64, version: u64) -> pb::WatchResponse {
    pb::WatchResponse {
        event: Some(pb::watch_response::Event::Progress(pb::Progress {
            version,
            epoch,
        })),
    }
}

/// The gRPC status for a registry error.
pub fn status(e: &RegistryError) -> Status {
    let code = match e {
        RegistryError::Invalid(_) => Code::InvalidArgument,
        RegistryError::Unauthenticated(_) => Code::Unauthenticated,
        RegistryError::UnknownRegistration(_) | RegistryError::NotFound(_) => Code::NotFound,
        RegistryError::Exhausted { .. } => Code::ResourceExhausted,
        RegistryError::Removed { .. } => Code::FailedPrecondition,
        RegistryError::AlreadyRegistered { .. } => Code::AlreadyExists,
    };
    Status::new(code, e.to_string())
}

/// Why a watch message could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum WatchApplyError {
    /// The message was malformed.
    #[error("malformed watch message: {0}")]
    Malformed(String),
    /// An update for another base version: the stream must be reopened for a snapshot.
    #[error("update for version {expected} received while holding {held}")]
    Gap {
        /// The update's base version.
        expected: u64,
        /// The version held.
        held: u64,
    },
    /// An update or progress of another registry run than the topology held: the stream
    /// crossed a registry restart and must be reopened for a snapshot of the new epoch.
    #[error("message of registry epoch {offered:x} received while holding epoch {held:x}")]
    EpochChanged {
        /// The message's epoch.
        offered: u64,
        /// The epoch held.
        held: u64,
    },
}

/// Applies a watch message to the topology held (if any): `Ok(Some(t))` is a newer topology to
/// apply, `Ok(None)` means nothing new (progress, or a version already held).
///
/// A snapshot of another epoch than the one held is taken whatever its version (the registry
/// restarted; see the epoch rules in the .proto); an update or progress of another epoch is
/// [`WatchApplyError::EpochChanged`].
pub fn next_topology(
    cluster: &str,
    held: Option<&Arc<ClusterTopology>>,
    msg: pb::WatchResponse,
) -> Result<Option<Arc<ClusterTopology>>, WatchApplyError> {
    let held_version = held.map_or(0, |t| t.version());
    let bad = |e: ModelError| WatchApplyError::Malformed(e.to_string());
    let same_epoch = |epoch: u64| match held {
        Some(h) if h.epoch() != epoch => Err(WatchApplyError::EpochChanged {
            offered: epoch,
            held: h.epoch(),
        }),
        _ => Ok(()),
    };
    match msg.event {
        None => Err(WatchApplyError::Malformed("empty watch message".into())),
        Some(pb::watch_response::Event::Progress(p)) => {
            same_epoch(p.epoch)?;
            // The registry says it is at a version this watcher never received: an update
            // went missing (a server may only send progress at a version the watcher holds).
            if held.is_some() && p.version > held_version {
                return Err(WatchApplyError::Gap {
                    expected: p.version,
                    held: held_version,
                });
            }
            Ok(None)
        }
        Some(pb::watch_response::Event::Snapshot(s)) => {
            if s.fragment {
                return Err(WatchApplyError::Malformed(
                    "a snapshot fragment (reassemble fragments with SnapshotAssembler first)"
                        .into(),
                ));
            }
            let same_run = |h: &Arc<ClusterTopology>| {
                h.epoch() == s.epoch || sim::flaw("snapshot-ignores-epoch")
            };
            if held.is_some_and(|h| same_run(h) && s.version <= h.version()) {
                return Ok(None);
            }
            let (epoch, version) = (s.epoch, s.version);
            let members = snapshot_members(s)?
                .into_iter()
                .map(member_from_pb)
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?;
            Ok(Some(Arc::new(
                ClusterTopology::new(cluster, version, members)
                    .map_err(bad)?
                    .with_epoch(epoch),
            )))
        }
        Some(pb::watch_response::Event::Update(u)) => {
            same_epoch(u.epoch)?;
            if u.version <= held_version {
                return Ok(None);
            }
            if u.previous_version != held_version && !sim::flaw("update-gap-ignored") {
                return Err(WatchApplyError::Gap {
                    expected: u.previous_version,
                    held: held_version,
                });
            }
            let mut left = Vec::with_capacity(u.left.len());
            for id in u.left {
                let id = MemberId::parse(&id).map_err(bad)?;
                if !sim::flaw("update-ignores-left") {
                    left.push(id);
                }
            }
            let changed = if sim::flaw("update-ignores-changed") {
                Vec::new()
            } else {
                u.changed
            };
            let mut upserts: Vec<Arc<Member>> = Vec::with_capacity(u.joined.len() + changed.len());
            for m in u.joined.into_iter().chain(changed) {
                upserts.push(Arc::new(member_from_pb(m).map_err(bad)?));
            }
            // The held version patched (removals first, then joins and changes, a later entry
            // for one id replacing an earlier one): unchanged members are shared, nothing is
            // rebuilt or re-sorted.
            let mut next = match held {
                Some(h) => ClusterTopology::clone(h),
                None => ClusterTopology::empty(cluster),
            };
            let gone: Vec<&MemberId> = left.iter().collect();
            next.patch(u.version, &gone, &upserts);
            Ok(Some(Arc::new(next.with_epoch(u.epoch))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str) -> Member {
        Member::new(MemberId::parse(id).unwrap(), format!("{id}:1"), ["k"]).with_zone("z")
    }

    #[test]
    fn members_round_trip() {
        let mut member = m("a");
        member.metadata.insert("k".into(), "v".into());
        assert_eq!(member_from_pb(member_to_pb(&member)).unwrap(), member);
        let mut bad = member_to_pb(&member);
        bad.id = "NOT VALID".into();
        assert!(member_from_pb(bad).is_err());
    }

    #[test]
    fn fragments_reassemble_into_the_snapshot_and_interruptions_are_refused() {
        let t = Arc::new(ClusterTopology::new("c", 5, [m("a"), m("b"), m("c")]).unwrap());
        let packed = pack_members(&t);
        let pieces: Vec<_> = packed.chunks(7).collect();
        let mut asm = SnapshotAssembler::new(1 << 20);
        for (i, p) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let out = asm
                .feed(snapshot_fragment(
                    0,
                    5,
                    pb::MembersEncoding::Plain,
                    prost::bytes::Bytes::copy_from_slice(p),
                    !last,
                ))
                .unwrap();
            if last {
                let whole = out.expect("the last fragment completes it");
                assert_eq!(next_topology("c", None, whole).unwrap().unwrap(), t);
            } else {
                assert!(out.is_none() && asm.is_partial());
            }
        }
        // Whole snapshots and other messages pass through.
        assert!(asm.feed(progress(0, 5)).unwrap().is_some());
        assert!(asm.feed(snapshot(&t)).unwrap().is_some());
        // A fragment sequence interrupted, mixed or too large is malformed.
        let piece =
            |v, more| snapshot_fragment(0, v, pb::MembersEncoding::Plain, packed.slice(0..3), more);
        let mut asm = SnapshotAssembler::new(1 << 20);
        asm.feed(piece(5, true)).unwrap();
        assert!(asm.feed(progress(0, 5)).is_err());
        let mut asm = SnapshotAssembler::new(1 << 20);
        asm.feed(piece(5, true)).unwrap();
        assert!(asm.feed(piece(6, false)).is_err());
        let mut asm = SnapshotAssembler::new(4);
        asm.feed(piece(5, true)).unwrap();
        assert!(asm.feed(piece(5, false)).is_err());
        // So is a fragment whose encoding differs from the first's.
        let mut asm = SnapshotAssembler::new(1 << 20);
        asm.feed(piece(5, true)).unwrap();
        let zlib = snapshot_fragment(0, 5, pb::MembersEncoding::Zlib, packed.slice(3..), false);
        assert!(asm.feed(zlib).is_err());
    }

    /// A large member list (as the benchmark's and a real cluster's: ids with random parts)
    /// compresses, applies like the plain one, also in fragments, and a compressed list that
    /// is too large once expanded, cut short, followed by garbage or in an unknown encoding is
    /// refused.
    #[test]
    fn compressed_members_apply_like_plain_ones_and_bad_ones_are_refused() {
        let members = (0..500u32).map(|i| {
            let r = i.wrapping_mul(2_654_435_761);
            let mut m = m(&format!("shop-{i:03}-18c3f0a{i:04x}-{r:08x}"));
            m.address = format!("10.{}.{}.{}:4000", r >> 24, (r >> 16) & 255, r & 255);
            m
        });
        let t = Arc::new(ClusterTopology::new("c", 7, members).unwrap());
        let plain = PackedMembers::plain(pack_members(&t));
        let zlib = plain.compressed().expect("a large list compresses");
        assert!(
            zlib.bytes.len() * 2 < plain.bytes.len(),
            "{} -> {}",
            plain.bytes.len(),
            zlib.bytes.len()
        );
        let whole = snapshot_encoded(0, 7, zlib.clone());
        assert_eq!(next_topology("c", None, whole).unwrap().unwrap(), t);
        let mut asm = SnapshotAssembler::new(1 << 20);
        let pieces: Vec<_> = zlib.bytes.chunks(100).collect();
        let mut out = None;
        for (i, p) in pieces.iter().enumerate() {
            let piece = prost::bytes::Bytes::copy_from_slice(p);
            let more = i + 1 < pieces.len();
            out = asm
                .feed(snapshot_fragment(0, 7, zlib.encoding, piece, more))
                .unwrap();
        }
        assert_eq!(next_topology("c", None, out.unwrap()).unwrap().unwrap(), t);
        // A tiny list does not get smaller.
        let tiny = ClusterTopology::new("c", 1, [m("a")]).unwrap();
        assert!(
            PackedMembers::plain(pack_members(&tiny))
                .compressed()
                .is_none()
        );

        let refused = |bytes: &[u8], encoding: i32| {
            let mut msg = snapshot_packed(0, 7, prost::bytes::Bytes::copy_from_slice(bytes));
            if let Some(pb::watch_response::Event::Snapshot(s)) = &mut msg.event {
                s.encoding = encoding;
            }
            matches!(
                next_topology("c", None, msg),
                Err(WatchApplyError::Malformed(_))
            )
        };
        let zlib_code = pb::MembersEncoding::Zlib as i32;
        // Expands beyond the limit: refused without expanding it all.
        assert!(decompress_members(&zlib.bytes, 1000).is_err());
        assert_eq!(
            decompress_members(&zlib.bytes, plain.bytes.len()).unwrap(),
            plain.bytes
        );
        // Cut short (no checksum), followed by garbage, or not compressed at all.
        assert!(refused(&zlib.bytes[..zlib.bytes.len() / 2], zlib_code));
        assert!(refused(&zlib.bytes[..zlib.bytes.len() - 1], zlib_code));
        let mut longer = zlib.bytes.to_vec();
        longer.extend_from_slice(b"more");
        assert!(refused(&longer, zlib_code));
        assert!(refused(&plain.bytes, zlib_code));
        // A flipped bit fails the checksum (or the deflate stream).
        let mut flipped = zlib.bytes.to_vec();
        flipped[zlib.bytes.len() / 2] ^= 0x10;
        assert!(refused(&flipped, zlib_code));
        // Compressed, but announced as plain; an encoding nobody defined.
        assert!(refused(&zlib.bytes, 0));
        assert!(refused(&plain.bytes, 9));
    }

    #[test]
    fn snapshots_and_updates_apply_in_order_and_gaps_are_detected() {
        let t1 = Arc::new(ClusterTopology::new("c", 5, [m("a"), m("b")]).unwrap());
        let got = next_topology("c", None, snapshot(&t1)).unwrap().unwrap();
        assert_eq!(got, t1);
        assert!(
            next_topology("c", Some(&t1), snapshot(&t1))
                .unwrap()
                .is_none(),
            "not newer"
        );
        let change = Change {
            topology: Arc::new(ClusterTopology::new("c", 6, [m("a"), m("c")]).unwrap()),
            previous_version: 5,
            joined: vec![m("c")],
            changed: vec![],
            left: vec![m("b")],
            expired: false,
        };
        let t2 = next_topology("c", Some(&t1), update(&change))
            .unwrap()
            .unwrap();
        assert_eq!(t2, change.topology);
        let stale_base = ClusterTopology::new("c", 4, [m("a")]).unwrap();
        assert!(matches!(
            next_topology("c", Some(&Arc::new(stale_base)), update(&change)),
            Err(WatchApplyError::Gap {
                expected: 5,
                held: 4
            })
        ));
        assert!(
            next_topology("c", Some(&t2), progress(0, 6))
                .unwrap()
                .is_none()
        );
        assert!(next_topology("c", None, pb::WatchResponse { event: None }).is_err());
    }

    #[test]
    fn progress_beyond_the_version_held_is_a_gap() {
        let held = Arc::new(
            ClusterTopology::new("c", 7, [m("a")])
                .unwrap()
                .with_epoch(3),
        );
        assert!(matches!(
            next_topology("c", Some(&held), progress(3, 7)),
            Ok(None)
        ));
        // An update went missing: the registry is at 9, this watcher holds 7.
        assert!(matches!(
            next_topology("c", Some(&held), progress(3, 9)),
            Err(WatchApplyError::Gap {
                expected: 9,
                held: 7
            })
        ));
        // Nothing held yet (a resumed stream's first message): nothing to compare with.
        assert!(matches!(next_topology("c", None, progress(3, 9)), Ok(None)));
    }

    #[test]
    fn another_epoch_resets_by_snapshot_and_stops_updates_and_progress() {
        let held = Arc::new(
            ClusterTopology::new("c", 500, [m("a"), m("b")])
                .unwrap()
                .with_epoch(1),
        );
        // The registry restarted with its clock behind: lower versions, another epoch.
        let restarted = ClusterTopology::new("c", 20, [m("a")])
            .unwrap()
            .with_epoch(2);
        let got = next_topology("c", Some(&held), snapshot(&restarted))
            .unwrap()
            .expect("a snapshot of another epoch is taken whatever its version");
        assert_eq!((got.epoch(), got.version(), got.len()), (2, 20, 1));
        assert!(matches!(
            next_topology("c", Some(&held), progress(2, 20)),
            Err(WatchApplyError::EpochChanged {
                offered: 2,
                held: 1
            })
        ));
        let change = Change {
            topology: Arc::new(
                ClusterTopology::new("c", 501, [m("a")])
                    .unwrap()
                    .with_epoch(2),
            ),
            previous_version: 500,
            joined: vec![],
            changed: vec![],
            left: vec![m("b")],
            expired: false,
        };
        assert!(
            matches!(
                next_topology("c", Some(&held), update(&change)),
                Err(WatchApplyError::EpochChanged { .. })
            ),
            "an update of another epoch never applies to this base, even with matching versions"
        );
        let same = next_topology("c", Some(&got), snapshot(&restarted)).unwrap();
        assert!(same.is_none(), "the same epoch and version is not new");
    }

    #[test]
    fn packed_and_inline_snapshots_both_apply() {
        let t = ClusterTopology::new("c", 9, [m("a"), m("b")]).unwrap();
        let packed = snapshot(&t);
        let Some(pb::watch_response::Event::Snapshot(s)) = &packed.event else {
            panic!()
        };
        assert!(s.members.is_empty() && !s.packed_members.is_empty());
        let inline = pb::WatchResponse {
            event: Some(pb::watch_response::Event::Snapshot(pb::Snapshot {
                version: 9,
                epoch: 0,
                members: t.members().iter().map(|m| member_to_pb(m)).collect(),
                packed_members: Default::default(),
                fragment: false,
                encoding: 0,
            })),
        };
        for msg in [packed, inline] {
            assert_eq!(*next_topology("c", None, msg).unwrap().unwrap(), t);
        }
        let garbage = snapshot_packed(0, 10, prost::bytes::Bytes::from_static(&[0xff, 0xff, 0xff]));
        assert!(matches!(
            next_topology("c", None, garbage),
            Err(WatchApplyError::Malformed(_))
        ));
    }

    #[test]
    fn statuses() {
        assert_eq!(
            status(&RegistryError::Invalid("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            status(&RegistryError::Unauthenticated("c".into())).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            status(&RegistryError::UnknownRegistration("c".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            status(&RegistryError::Exhausted {
                limit: "max_clusters",
                message: "x".into()
            })
            .code(),
            Code::ResourceExhausted
        );
    }
}
