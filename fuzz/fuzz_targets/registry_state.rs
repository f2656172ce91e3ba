//! Fuzzes the registry's state machine with arbitrary sequences of joins, heartbeats, leaves,
//! sweeps and clock advances, and checks every answer against a plain model written here:
//! - a join of a registered id succeeds only with its incarnation secret (else
//!   `AlreadyRegistered`); a removed id never comes back (`Removed`) while remembered; a member
//!   joining at another member's address supersedes it; an `update_only` join of an id that is
//!   not registered is `NotFound`;
//! - heartbeat and leave succeed exactly for live tokens; a sweep removes exactly the
//!   registrations whose TTL ran out, and reports each member in one change per cluster;
//! - after every step each cluster's topology lists exactly the model's members, versions only
//!   grow, and every published change applies to the version before it.
//!
//! The state machine's own invariants (`check_invariants`) run too: the fuzz build has debug
//! assertions on.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shoal::registry::{Change, JoinKeys, RegistryConfig, RegistryError, RegistryState, Role};
use shoal::{Member, MemberId};
use shoal::runtime::Instant;

#[derive(Arbitrary, Debug)]
enum Op {
    Join {
        cluster: u8,
        id: u8,
        address: u8,
        client: bool,
        secret: u8,
        zone: bool,
        update_only: bool,
    },
    Heartbeat {
        token: u8,
    },
    Leave {
        token: u8,
    },
    Sweep,
    Advance {
        ms: u16,
    },
}

const CLUSTERS: [&str; 2] = ["a", "b"];
const TTL: Duration = Duration::from_secs(6);

#[derive(Clone, Debug)]
struct Reg {
    member: Member,
    client: bool,
    secret: String,
    token: String,
    expires_at: Instant,
}

#[derive(Default)]
struct Model {
    /// (cluster, id) -> registration.
    regs: BTreeMap<(String, MemberId), Reg>,
    /// (cluster, id) -> removed at.
    removed: BTreeMap<(String, MemberId), Instant>,
    /// Tokens ever handed out, in order (ops pick one by index).
    tokens: Vec<(String, String)>,
}

impl Model {
    fn members(&self, cluster: &str) -> Vec<(MemberId, String)> {
        self.regs
            .iter()
            .filter(|((c, _), r)| c == cluster && !r.client)
            .map(|((_, id), r)| (id.clone(), r.member.address.clone()))
            .collect()
    }

    fn token_owner(&self, cluster: &str, token: &str) -> Option<MemberId> {
        self.regs
            .iter()
            .find(|((c, _), r)| c == cluster && r.token == token)
            .map(|((_, id), _)| id.clone())
    }

    fn remove(&mut self, cluster: &str, id: &MemberId, now: Instant) -> Reg {
        let reg = self
            .regs
            .remove(&(cluster.to_string(), id.clone()))
            .expect("registered");
        if !reg.client {
            self.removed.insert((cluster.to_string(), id.clone()), now);
        }
        reg
    }
}

fn check_change(change: &Change, versions: &mut BTreeMap<String, u64>) {
    let cluster = change.topology.cluster_name().to_string();
    let held = versions.get(&cluster).copied().unwrap_or(0);
    assert_eq!(change.previous_version, held, "a change applies to the version before it");
    assert!(change.topology.version() > held, "versions only grow");
    versions.insert(cluster, change.topology.version());
}

fuzz_target!(|ops: Vec<Op>| {
    let config = RegistryConfig {
        ttl: TTL,
        ..RegistryConfig::default()
    };
    let mut state = RegistryState::new(Arc::new(config), 1_000, 7);
    let mut model = Model::default();
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    let mut now = start;
    let mut next_token = 0u64;
    for op in ops.into_iter().take(200) {
        match op {
            Op::Join {
                cluster,
                id,
                address,
                client,
                secret,
                zone,
                update_only,
            } => {
                let cluster = CLUSTERS[usize::from(cluster) % CLUSTERS.len()];
                let id = MemberId::parse(format!("m{}", id % 8)).expect("valid id");
                let mut member = Member::new(id.clone(), format!("10.0.0.{}:1", address % 6), ["k"]);
                if zone {
                    member = member.with_zone("z");
                }
                let secret = if secret % 4 == 0 { String::new() } else { format!("s{}", secret % 4) };
                next_token += 1;
                let token = format!("t{next_token}");
                let role = if client { Role::Client } else { Role::Member };
                let keys = JoinKeys {
                    token: token.clone(),
                    secret: secret.clone(),
                    update_only,
                };
                let got = state.join(cluster, "", member.clone(), role, keys, now);
                let key = (cluster.to_string(), id.clone());
                let existing = model.regs.get(&key).cloned();
                let expected_err = if !client && model.removed.contains_key(&key) {
                    Some("removed")
                } else if update_only && existing.is_none() {
                    Some("notfound")
                } else if let Some(e) = &existing {
                    if e.secret.is_empty() || e.secret != secret {
                        Some("already")
                    } else if e.client != client {
                        Some("invalid")
                    } else {
                        None
                    }
                } else {
                    None
                };
                match (got, expected_err) {
                    (Err(RegistryError::Removed { .. }), Some("removed"))
                    | (Err(RegistryError::AlreadyRegistered { .. }), Some("already"))
                    | (Err(RegistryError::Invalid(_)), Some("invalid"))
                    | (Err(RegistryError::NotFound(_)), Some("notfound")) => {}
                    (Ok((joined, change)), None) => {
                        assert_eq!(joined.token, token);
                        let mut superseded = Vec::new();
                        if !client {
                            let other = model
                                .regs
                                .iter()
                                .find(|((c, i), r)| {
                                    c == cluster && *i != id && !r.client && r.member.address == member.address
                                })
                                .map(|((_, i), _)| i.clone());
                            if let Some(other) = other {
                                model.remove(cluster, &other, now);
                                superseded.push(other);
                            }
                        }
                        let before = existing.as_ref().map(|e| e.member.clone());
                        model.regs.insert(
                            key,
                            Reg {
                                member: member.clone(),
                                client,
                                secret,
                                token: token.clone(),
                                expires_at: now + TTL,
                            },
                        );
                        model.tokens.push((cluster.to_string(), token));
                        let changed_members = !client && (before.as_ref() != Some(&member) || !superseded.is_empty());
                        match change {
                            Some(change) => {
                                assert!(changed_members, "a change published for nothing");
                                let left: Vec<MemberId> = change.left.iter().map(|m| m.id.clone()).collect();
                                assert_eq!(left, superseded, "superseded members leave in the same change");
                                assert!(!change.expired);
                                check_change(&change, &mut versions);
                            }
                            None => assert!(!changed_members, "a membership change was not published"),
                        }
                    }
                    (got, expected) => panic!("join: got {got:?}, the model expects {expected:?}"),
                }
            }
            Op::Heartbeat { token } => {
                let Some((cluster, token)) = pick(&model.tokens, token) else { continue };
                let owner = model.token_owner(&cluster, &token);
                let got = state.heartbeat(&cluster, &token, now);
                match (got, owner) {
                    (Ok(_), Some(id)) => {
                        model.regs.get_mut(&(cluster, id)).expect("owner").expires_at = now + TTL;
                    }
                    (Err(RegistryError::UnknownRegistration(_)), None) => {}
                    (got, owner) => panic!("heartbeat: got {got:?}, the model says the owner is {owner:?}"),
                }
            }
            Op::Leave { token } => {
                let Some((cluster, token)) = pick(&model.tokens, token) else { continue };
                let owner = model.token_owner(&cluster, &token);
                let got = state.leave(&cluster, &token, now);
                match (got, owner) {
                    (Ok(change), Some(id)) => {
                        let reg = model.remove(&cluster, &id, now);
                        assert_eq!(change.is_some(), !reg.client, "a member's leave is published, a client's is not");
                        if let Some(change) = change {
                            assert_eq!(change.left.len(), 1);
                            assert_eq!(change.left[0].id, id);
                            check_change(&change, &mut versions);
                        }
                    }
                    (Err(RegistryError::UnknownRegistration(_)), None) => {}
                    (got, owner) => panic!("leave: got {got:?}, the model says the owner is {owner:?}"),
                }
            }
            Op::Sweep => {
                let due: Vec<(String, MemberId)> = model
                    .regs
                    .iter()
                    .filter(|(_, r)| r.expires_at <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                let mut expected: BTreeMap<String, BTreeSet<MemberId>> = BTreeMap::new();
                for (cluster, id) in due {
                    let reg = model.remove(&cluster, &id, now);
                    if !reg.client {
                        expected.entry(cluster).or_default().insert(id);
                    }
                }
                let changes = state.sweep(now);
                let got: BTreeMap<String, BTreeSet<MemberId>> = changes
                    .iter()
                    .map(|c| {
                        (
                            c.topology.cluster_name().to_string(),
                            c.left.iter().map(|m| m.id.clone()).collect(),
                        )
                    })
                    .collect();
                assert_eq!(got, expected, "the sweep removed other registrations than the model");
                for change in &changes {
                    assert!(change.expired);
                    check_change(change, &mut versions);
                }
                // The registry forgets removed ids after ten TTLs.
                model
                    .removed
                    .retain(|_, at| now.duration_since(*at) < TTL * 10);
            }
            Op::Advance { ms } => now += Duration::from_millis(u64::from(ms) * 10),
        }
        for cluster in CLUSTERS {
            if !model.regs.keys().any(|(c, _)| c == cluster) {
                // The registry drops an empty cluster; a new one starts from version 0.
                versions.remove(cluster);
            }
            let t = state.topology(cluster);
            let listed: Vec<(MemberId, String)> = t
                .members()
                .iter()
                .map(|m| (m.id.clone(), m.address.clone()))
                .collect();
            assert_eq!(listed, model.members(cluster), "cluster {cluster}: topology differs from the model");
            if !listed.is_empty() {
                assert_eq!(Some(&t.version()), versions.get(cluster), "the topology is the last change's");
            }
        }
    }
});

fn pick(tokens: &[(String, String)], i: u8) -> Option<(String, String)> {
    if tokens.is_empty() {
        return None;
    }
    Some(tokens[usize::from(i) % tokens.len()].clone())
}
