//! Fuzzes `wire::next_topology`, the client's application of watch messages, over arbitrary
//! sequences of snapshots, updates and progress messages (arbitrary epochs, versions, bases,
//! members, and malformed ones), checked against a plain model written here:
//! - it never panics; a malformed message is an error, never a topology;
//! - a snapshot is taken when nothing is held, when it is of another epoch, or when it is newer
//!   in the same epoch, and then holds exactly its members;
//! - an update applies only to the version and epoch held, and gives held - left + joined +
//!   changed; an update or progress of another epoch is `EpochChanged`;
//! - a progress message of the held epoch at a version newer than the one held is a `Gap` (an
//!   update went missing), and otherwise changes nothing;
//! - within one epoch, the versions a client applies only grow.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shoal::ClusterTopology;
use shoal::registry::pb;
use shoal::registry::wire::{WatchApplyError, next_topology};

#[derive(Arbitrary, Debug)]
struct FuzzMember {
    id: u8,
    address: u8,
    bad: bool,
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Snapshot {
        epoch: u8,
        version: u8,
        members: Vec<FuzzMember>,
        packed: bool,
    },
    Update {
        epoch: u8,
        version: u8,
        previous: u8,
        joined: Vec<FuzzMember>,
        left: Vec<u8>,
        changed: Vec<FuzzMember>,
    },
    Progress {
        epoch: u8,
        version: u8,
    },
    Empty,
    Garbage(Vec<u8>),
}

fn member(m: &FuzzMember) -> pb::Member {
    pb::Member {
        id: if m.bad { "Not Valid".into() } else { format!("m{}", m.id % 8) },
        address: format!("10.0.0.{}:1", m.address % 4),
        kinds: vec!["k".into()],
        ..Default::default()
    }
}

/// The model's view: epoch, version, id -> address.
type View = (u64, u64, BTreeMap<String, String>);

fn view(t: &ClusterTopology) -> View {
    (
        t.epoch(),
        t.version(),
        t.members()
            .iter()
            .map(|m| (m.id.to_string(), m.address.clone()))
            .collect(),
    )
}

fuzz_target!(|msgs: Vec<Msg>| {
    let mut held: Option<Arc<ClusterTopology>> = None;
    for msg in msgs.into_iter().take(100) {
        let model: Option<View> = held.as_ref().map(|t| view(t));
        let (wire, expect): (pb::WatchResponse, Expect) = match &msg {
            Msg::Snapshot {
                epoch,
                version,
                members,
                packed,
            } => {
                let (epoch, version) = (u64::from(*epoch % 3) + 1, u64::from(*version));
                let list: Vec<pb::Member> = members.iter().map(member).collect();
                let ids: Vec<&String> = list.iter().map(|m| &m.id).collect();
                let malformed = members.iter().any(|m| m.bad)
                    || ids.iter().enumerate().any(|(i, id)| ids[..i].contains(id));
                let newer = model
                    .as_ref()
                    .is_none_or(|(e, v, _)| *e != epoch || version > *v);
                let expect = if !newer {
                    Expect::Nothing
                } else if malformed {
                    Expect::Malformed
                } else {
                    Expect::Topology((
                        epoch,
                        version,
                        list.iter().map(|m| (m.id.clone(), m.address.clone())).collect(),
                    ))
                };
                let snapshot = if *packed {
                    // Odd versions go compressed when that makes them smaller.
                    let plain = shoal::registry::wire::PackedMembers::plain(
                        prost::Message::encode_to_vec(&pb::MemberList { members: list }).into(),
                    );
                    let packed = match plain.compressed() {
                        Some(c) if version % 2 == 1 => c,
                        _ => plain,
                    };
                    pb::Snapshot {
                        version,
                        epoch,
                        members: Vec::new(),
                        packed_members: packed.bytes,
                        fragment: false,
                        encoding: packed.encoding as i32,
                    }
                } else {
                    pb::Snapshot {
                        version,
                        epoch,
                        members: list,
                        packed_members: Default::default(),
                        fragment: false,
                        encoding: 0,
                    }
                };
                (
                    pb::WatchResponse {
                        event: Some(pb::watch_response::Event::Snapshot(snapshot)),
                    },
                    expect,
                )
            }
            Msg::Update {
                epoch,
                version,
                previous,
                joined,
                left,
                changed,
            } => {
                let (epoch, version, previous) =
                    (u64::from(*epoch % 3) + 1, u64::from(*version), u64::from(*previous));
                let joined: Vec<pb::Member> = joined.iter().map(member).collect();
                let changed: Vec<pb::Member> = changed.iter().map(member).collect();
                let left: Vec<String> = left.iter().map(|i| format!("m{}", i % 8)).collect();
                let held_version = model.as_ref().map_or(0, |(_, v, _)| *v);
                let expect = match &model {
                    Some((e, _, _)) if *e != epoch => Expect::EpochChanged,
                    _ if version <= held_version => Expect::Nothing,
                    _ if previous != held_version => Expect::Gap,
                    _ if joined.iter().chain(&changed).any(|m| m.id.contains(' ')) => Expect::Malformed,
                    _ => {
                        let mut members = model.as_ref().map(|(_, _, m)| m.clone()).unwrap_or_default();
                        for id in &left {
                            members.remove(id);
                        }
                        for m in joined.iter().chain(&changed) {
                            members.insert(m.id.clone(), m.address.clone());
                        }
                        Expect::Topology((epoch, version, members))
                    }
                };
                (
                    pb::WatchResponse {
                        event: Some(pb::watch_response::Event::Update(pb::Update {
                            version,
                            epoch,
                            previous_version: previous,
                            joined,
                            left,
                            changed,
                        })),
                    },
                    expect,
                )
            }
            Msg::Progress { epoch, version } => {
                let epoch = u64::from(*epoch % 3) + 1;
                let expect = match &model {
                    Some((e, _, _)) if *e != epoch => Expect::EpochChanged,
                    // The registry is at a version this client never received: a gap.
                    Some((_, v, _)) if u64::from(*version) > *v => Expect::Gap,
                    _ => Expect::Nothing,
                };
                (
                    pb::WatchResponse {
                        event: Some(pb::watch_response::Event::Progress(pb::Progress {
                            version: u64::from(*version),
                            epoch,
                        })),
                    },
                    expect,
                )
            }
            Msg::Empty => (pb::WatchResponse { event: None }, Expect::Malformed),
            Msg::Garbage(bytes) => {
                let newer = model.as_ref().is_none_or(|(e, v, _)| *e != 1 || 200 > *v);
                (
                    pb::WatchResponse {
                        event: Some(pb::watch_response::Event::Snapshot(pb::Snapshot {
                            version: 200,
                            epoch: 1,
                            members: Vec::new(),
                            packed_members: bytes.clone().into(),
                            fragment: false,
                            // Half of them claim to be compressed (the decompressor's input).
                            encoding: (bytes.len() % 2) as i32,
                        })),
                    },
                    // Arbitrary bytes may happen to decode; only check it does not panic.
                    if newer { Expect::Anything } else { Expect::Nothing },
                )
            }
        };
        let got = next_topology("c", held.as_ref(), wire);
        match (got, expect) {
            (Ok(None), Expect::Nothing) => {}
            (Ok(Some(t)), Expect::Topology(want)) => {
                assert_eq!(view(&t), want, "applied topology differs from the model");
                if let Some((e, v, _)) = &model {
                    assert!(t.epoch() != *e || t.version() > *v, "a version went backwards");
                }
                held = Some(t);
            }
            (Err(WatchApplyError::Malformed(_)), Expect::Malformed)
            | (Err(WatchApplyError::Gap { .. }), Expect::Gap)
            | (Err(WatchApplyError::EpochChanged { .. }), Expect::EpochChanged) => {}
            (Ok(Some(t)), Expect::Anything) => held = Some(t),
            (_, Expect::Anything) => {}
            (got, expect) => panic!("{msg:?}: got {got:?}, the model expects {expect:?}"),
        }
    }
});

#[derive(Debug)]
enum Expect {
    Nothing,
    Topology(View),
    Malformed,
    Gap,
    EpochChanged,
    Anything,
}
