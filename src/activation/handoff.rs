//! State hand-off between successive holders of an identity, with no loss and no rollback
//! (pure: no I/O, no time).
//!
//! A member that deactivates an identity *keeps* what it knows of it, a [`Kept`]: the
//! generation it held it under and the state its actor handed over. A claimant's round asks
//! every member to let go and gets a *copy* of each record: an answer lost on the network, or a
//! round that fails, loses nothing. The claimant chooses with [`choose`] (the highest generation
//! any member reported wins; the new activation is one higher) and, before it activates with a
//! member's state, *settles* it with that member ([`HandOffs::settle`]): the record notes
//! that claimant and the generation it activates as. From then on the copy counts as
//! superseded for every other claimant, unless that claimant's own answer shows it never
//! reached that generation (its activation did not happen): so an old copy never resurfaces
//! as current after a newer holder lost its state (a rollback), and a settle whose claimant
//! then failed loses nothing either.

use std::collections::BTreeMap;

use crate::cluster::MemberId;

/// What a member knows of an identity it held (or the state of which it keeps): see the
/// module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// The newest generation it knows of.
    pub generation: u64,
    /// The state of that generation, if this member keeps it.
    pub state: Option<Vec<u8>>,
    /// The claimant that settled it, and the generation it activates as.
    pub settled: Option<(MemberId, u64)>,
    /// The topology (epoch, version) that generation was held under when it was deactivated
    /// ((0, 0): unknown). Orders two activations that reached the same generation without
    /// hearing of each other (see [`choose`]).
    pub under: (u64, u64),
    /// Whether its state was dropped because this member lost its membership after that
    /// generation (see [`HandOffs::lost`]).
    pub lost: bool,
}

/// One member's answer in a claim's round, as [`choose`] reads it.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    /// Who answered.
    pub member: &'a MemberId,
    /// Its generation (0: none known).
    pub generation: u64,
    /// The state it kept, if any.
    pub state: Option<&'a [u8]>,
    /// The claimant that settled that state, and the generation it activates as.
    pub settled: Option<(&'a MemberId, u64)>,
    /// See [`Kept::under`].
    pub under: (u64, u64),
    /// See [`Kept::lost`].
    pub lost: bool,
}

/// What a claimant activates with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    /// The generation of the new activation: one more than the highest reported.
    pub generation: u64,
    /// The state to hand to the actor.
    pub state: Option<Vec<u8>>,
    /// The member whose state it is (to settle with before activating).
    pub from: Option<MemberId>,
}

/// Chooses the state claimant `me` activates with, from every answer of its round (and its own
/// record, as an answer of its own): the state of the highest generation, if any member keeps
/// it. A copy settled by another claimant stands for that claimant's generation, with no state,
/// unless that claimant answered with an older generation (it never activated). A highest
/// generation whose state nobody keeps means it was lost (its holder lost its membership): the
/// actor starts from nothing rather than from an older copy.
///
/// Two activations can reach the same generation without hearing of each other: a claimant
/// does not ask a holder its view no longer lists (removed, then back as the same incarnation).
/// The one held under the later topology is the newer; when they cannot be ordered (another
/// epoch, an unknown topology), the records of members that lost their membership after
/// keeping them lose to the others (a line begun without asking them is newer); failing that,
/// neither is taken: the actor starts from nothing rather than perhaps from the older.
pub fn choose(me: &MemberId, answers: &[Answer<'_>]) -> Chosen {
    let reported = |m: &MemberId| {
        answers
            .iter()
            .filter(|a| a.member == m)
            .map(|a| a.generation)
            .max()
    };
    let read: Vec<Read<'_>> = answers
        .iter()
        .map(|a| match a.settled {
            Some((by, g))
                if by != me && g > a.generation && reported(by).is_none_or(|r| r >= g) =>
            {
                // Stands for `by`'s activation, of which nothing else is known here.
                Read {
                    generation: g,
                    state: None,
                    keeper: a.member,
                    activator: by,
                    under: (0, 0),
                    lost: false,
                }
            }
            _ => Read {
                generation: a.generation,
                state: a.state,
                keeper: a.member,
                activator: a.member,
                under: a.under,
                lost: a.lost,
            },
        })
        .collect();
    let top = read.iter().map(|r| r.generation).max().unwrap_or(0);
    let tops: Vec<&Read<'_>> = read.iter().filter(|r| r.generation == top).collect();
    let newest = newest_activation(&tops).or_else(|| {
        // Not ordered by topology: a record whose holder lost its membership after it is
        // older than a line begun by a member that did not (begun without asking it, while it
        // was not listed).
        let live: Vec<&Read<'_>> = tops.iter().copied().filter(|r| !r.lost).collect();
        (!live.is_empty() && live.len() < tops.len())
            .then(|| newest_activation(&live))
            .flatten()
    });
    let any = crate::runtime::sim::flaw("handoff-any-state");
    let kept = read.iter().find(|r| {
        r.state.is_some() && (any || (r.generation == top && Some(r.activator) == newest))
    });
    Chosen {
        generation: top + 1,
        state: kept.and_then(|r| r.state.map(<[u8]>::to_vec)),
        from: kept.map(|r| r.keeper.clone()),
    }
}

/// An answer as [`choose`] reads it.
struct Read<'a> {
    /// The generation it stands for.
    generation: u64,
    /// Its state, if usable.
    state: Option<&'a [u8]>,
    /// Who keeps it.
    keeper: &'a MemberId,
    /// Whose activation that generation was.
    activator: &'a MemberId,
    /// See [`Kept::under`].
    under: (u64, u64),
    /// See [`Kept::lost`].
    lost: bool,
}

/// The latest topology (epoch, version) one activation was held under, `None` if unknown, and
/// its state.
type HeldAs<'a> = (Option<(u64, u64)>, Option<&'a [u8]>);

/// Of the records of one generation, whose activation is the newest: the only one, or the one
/// held under the strictly latest topology of one epoch; `None` when they cannot be ordered.
/// Records alike in topology and state count as one (one process answering for two member
/// incarnations at its address: they are the same record, and either would do anyway).
fn newest_activation<'a>(tops: &[&Read<'a>]) -> Option<&'a MemberId> {
    let first = tops.first()?.activator;
    if tops.iter().all(|r| r.activator == first) {
        return Some(first);
    }
    // The latest topology each activation was held under (unknown if any record says so),
    // and its state.
    let mut by: BTreeMap<&MemberId, HeldAs<'_>> = BTreeMap::new();
    for r in tops.iter() {
        let known = (r.under != (0, 0)).then_some(r.under);
        by.entry(r.activator)
            .and_modify(|(u, s)| {
                *u = u.zip(known).map(|(a, b)| a.max(b));
                *s = s.or(r.state);
            })
            .or_insert((known, r.state));
    }
    let unders: Vec<(u64, u64)> = by.values().map(|v| v.0).collect::<Option<_>>()?;
    let epoch = unders[0].0;
    if unders.iter().any(|u| u.0 != epoch) {
        return None;
    }
    let latest = unders.iter().map(|u| u.1).max()?;
    let mut at_latest = by
        .iter()
        .filter(|(_, v)| v.0.is_some_and(|u| u.1 == latest));
    let (newest, (_, state)) = at_latest.next()?;
    at_latest.all(|(_, v)| v.1 == *state).then_some(*newest)
}

/// The [`Kept`] records of one member incarnation, bounded (oldest dropped first).
#[derive(Debug)]
pub struct HandOffs {
    by_key: BTreeMap<(String, String), (u64, Kept)>,
    order: BTreeMap<u64, (String, String)>,
    next: u64,
    /// The member incarnation the records belong to.
    incarnation: MemberId,
}

impl HandOffs {
    /// No record yet, for member incarnation `me`.
    pub fn new(me: MemberId) -> Self {
        Self {
            by_key: BTreeMap::new(),
            order: BTreeMap::new(),
            next: 0,
            incarnation: me,
        }
    }

    /// This member serves as incarnation `me` now. A new incarnation forgets every record:
    /// peers that removed the old one took its identities over without asking it, and began a
    /// line of generations a record of the old one must not outrank. The same incarnation
    /// restored (its lease held at the backend) keeps them: peers still ask it.
    pub fn adopt(&mut self, me: &MemberId) {
        if &self.incarnation != me {
            self.by_key.clear();
            self.order.clear();
            self.incarnation = me.clone();
        }
    }

    /// This member lost its membership: every state it keeps is dropped, and its generation
    /// kept. While it was not listed, peers may have begun a new line of generations without
    /// asking it, lower than its own; a state of it must not outrank theirs when it is asked
    /// again (a rollback), and its generation must still outrank older copies elsewhere (so the
    /// identity restarts from nothing rather than from one of those). Returns how many states
    /// were dropped.
    pub fn lost(&mut self) -> usize {
        let mut dropped = 0;
        for (_, kept) in self.by_key.values_mut() {
            dropped += usize::from(kept.state.take().is_some());
            kept.lost = true;
        }
        dropped
    }

    /// Records `kept` for `key` (replacing an older record), if it comes from the current
    /// incarnation `by`; at most `limit` records are kept. Returns how many were dropped at
    /// the bound.
    pub fn put(&mut self, key: (String, String), kept: Kept, limit: usize, by: &MemberId) -> usize {
        if by != &self.incarnation {
            return 0;
        }
        self.next += 1;
        if let Some((seq, _)) = self.by_key.insert(key.clone(), (self.next, kept)) {
            self.order.remove(&seq);
        }
        self.order.insert(self.next, key);
        let mut dropped = 0;
        while self.by_key.len() > limit.max(1) {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.by_key.remove(&old);
            dropped += 1;
        }
        dropped
    }

    /// The record of `key`, if any (a copy is what a claimant is answered).
    pub fn get(&self, key: &(String, String)) -> Option<&Kept> {
        self.by_key.get(key).map(|(_, k)| k)
    }

    /// Claimant `by` activates `key` as `generation` with the state this member keeps: the
    /// record notes it (see the module docs). Returns whether there was an older record.
    pub fn settle(&mut self, key: &(String, String), generation: u64, by: &MemberId) -> bool {
        match self.by_key.get_mut(key) {
            Some((_, kept)) if kept.generation < generation => {
                if kept.settled.as_ref().is_none_or(|(_, g)| *g <= generation) {
                    kept.settled = Some((by.clone(), generation));
                }
                true
            }
            _ => false,
        }
    }

    /// Forgets `key` (this member activated it again: its record is superseded).
    pub fn remove(&mut self, key: &(String, String)) {
        if let Some((seq, _)) = self.by_key.remove(key) {
            self.order.remove(&seq);
        }
    }

    /// The member incarnation the records belong to.
    pub fn incarnation(&self) -> &MemberId {
        &self.incarnation
    }

    /// How many records are kept.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no record is kept.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> MemberId {
        MemberId::parse(s).unwrap()
    }

    fn key(s: &str) -> (String, String) {
        ("k".to_string(), s.to_string())
    }

    fn kept(generation: u64, state: &[u8]) -> Kept {
        Kept {
            generation,
            state: Some(state.to_vec()),
            settled: None,
            under: (1, generation),
            lost: false,
        }
    }

    fn answer<'a>(member: &'a MemberId, generation: u64, state: Option<&'a [u8]>) -> Answer<'a> {
        Answer {
            member,
            generation,
            state,
            settled: None,
            under: (1, generation),
            lost: false,
        }
    }

    #[test]
    fn the_newest_generation_wins_and_the_new_one_is_higher() {
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let chosen = choose(
            &c,
            &[answer(&a, 3, Some(b"old")), answer(&b, 4, Some(b"new"))],
        );
        assert_eq!(chosen.state.as_deref(), Some(&b"new"[..]));
        assert_eq!(chosen.from, Some(b));
        assert_eq!(chosen.generation, 5);
        assert_eq!(choose(&c, &[]).generation, 1);
    }

    #[test]
    fn a_newer_generation_without_state_is_not_rolled_back_to_an_older_copy() {
        let (a, b, c) = (id("a"), id("b"), id("c"));
        // b held generation 4 and its state was dropped (a lost membership).
        let chosen = choose(&c, &[answer(&a, 3, Some(b"s3")), answer(&b, 4, None)]);
        assert_eq!((chosen.state, chosen.from), (None, None));
        assert_eq!(chosen.generation, 5);
    }

    #[test]
    fn a_copy_settled_by_another_claimant_stands_for_its_generation_unless_it_never_got_there() {
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let settled = Answer {
            settled: Some((&b, 4)),
            ..answer(&a, 3, Some(b"s3"))
        };
        // b is gone (it may have activated generation 4 and lost it): no rollback to s3.
        let chosen = choose(&c, &[settled]);
        assert_eq!((chosen.state, chosen.generation), (None, 5));
        // b answered and never reached generation 4 (its activation did not happen).
        let chosen = choose(&c, &[settled, answer(&b, 0, None)]);
        assert_eq!(chosen.state.as_deref(), Some(&b"s3"[..]));
        assert_eq!(chosen.generation, 4);
        // b answered with generation 4: its own answer decides (here: it kept the state).
        let chosen = choose(&c, &[settled, answer(&b, 4, Some(b"s4"))]);
        assert_eq!(chosen.state.as_deref(), Some(&b"s4"[..]));
        // The claimant that settled it asks again (its activation did not happen).
        let chosen = choose(&b, &[settled]);
        assert_eq!(chosen.state.as_deref(), Some(&b"s3"[..]));
    }

    #[test]
    fn records_are_copied_and_settling_keeps_the_state_for_the_settling_claimant() {
        let mut h = HandOffs::new(id("a"));
        assert_eq!(h.put(key("x"), kept(2, b"s"), 2, &id("a")), 0);
        // Asked any number of times: the same copy (a lost answer loses nothing).
        assert_eq!(h.get(&key("x")), Some(&kept(2, b"s")));
        assert!(h.settle(&key("x"), 3, &id("b")));
        assert_eq!(
            h.get(&key("x")),
            Some(&Kept {
                settled: Some((id("b"), 3)),
                ..kept(2, b"s")
            })
        );
        // An older settle changes nothing; the record's own generation is never settled.
        assert!(!h.settle(&key("x"), 2, &id("c")));
        // Oldest dropped at the bound.
        h.put(key("y"), kept(1, b"s"), 2, &id("a"));
        assert_eq!(h.put(key("z"), kept(1, b"s"), 2, &id("a")), 1);
        assert!(h.get(&key("x")).is_none());
        assert_eq!(h.len(), 2);
        // The same incarnation restored keeps its records; a new one forgets them, and a
        // deactivation of the old one that ends later is not recorded.
        h.adopt(&id("a"));
        assert_eq!(h.len(), 2);
        h.adopt(&id("a2"));
        assert!(h.is_empty());
        assert_eq!(h.put(key("x"), kept(1, b"s"), 2, &id("a")), 0);
        assert!(h.is_empty());
        h.put(key("x"), kept(1, b"s"), 2, &id("a2"));
        assert_eq!(h.len(), 1);
        // A lost membership drops the states and keeps the generations.
        assert_eq!(h.lost(), 1);
        assert_eq!(
            h.get(&key("x")),
            Some(&Kept {
                state: None,
                lost: true,
                ..kept(1, b"s")
            })
        );
    }

    #[test]
    fn one_generation_reached_twice_is_ordered_by_topology_or_not_taken() {
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let at = |m, under, state| Answer {
            under,
            ..answer(m, 2, state)
        };
        // b began generation 2 under a later topology of the same epoch than a's: b's is newer,
        // whether it kept its state or lost it.
        let chosen = choose(
            &c,
            &[at(&a, (1, 5), Some(b"a2")), at(&b, (1, 9), Some(b"b2"))],
        );
        assert_eq!(
            (chosen.state.as_deref(), chosen.generation),
            (Some(&b"b2"[..]), 3)
        );
        let chosen = choose(&c, &[at(&a, (1, 5), Some(b"a2")), at(&b, (1, 9), None)]);
        assert_eq!((chosen.state, chosen.from), (None, None));
        // Not comparable (two epochs, or unknown): neither is taken.
        let chosen = choose(
            &c,
            &[at(&a, (1, 5), Some(b"a2")), at(&b, (2, 1), Some(b"b2"))],
        );
        assert_eq!((chosen.state, chosen.generation), (None, 3));
        let chosen = choose(
            &c,
            &[at(&a, (1, 5), Some(b"a2")), at(&b, (0, 0), Some(b"b2"))],
        );
        assert_eq!(chosen.state, None);
        // One activation's records (a settled copy standing for b, and b's own) are no tie.
        let settled = Answer {
            settled: Some((&b, 2)),
            ..at(&a, (1, 5), Some(b"a1"))
        };
        let settled = Answer {
            generation: 1,
            ..settled
        };
        let chosen = choose(&c, &[settled, at(&b, (1, 9), Some(b"b2"))]);
        assert_eq!(chosen.state.as_deref(), Some(&b"b2"[..]));
        // One record answered for two incarnations at one address: no tie.
        let chosen = choose(
            &c,
            &[at(&a, (1, 5), Some(b"x")), at(&b, (1, 5), Some(b"x"))],
        );
        assert_eq!(chosen.state.as_deref(), Some(&b"x"[..]));
        // Alike in topology, not in state: not ordered.
        let chosen = choose(
            &c,
            &[at(&a, (1, 5), Some(b"x")), at(&b, (1, 5), Some(b"y"))],
        );
        assert_eq!(chosen.state, None);
        // Not ordered by topology, one of them dropped with its holder's membership: the
        // other line is the newer (begun while that holder was not listed).
        let dropped = Answer {
            lost: true,
            ..at(&a, (1, 5), None)
        };
        let chosen = choose(&c, &[dropped, at(&b, (2, 1), Some(b"b2"))]);
        assert_eq!(chosen.state.as_deref(), Some(&b"b2"[..]));
        // Ordered by topology, the later one stands, dropped or not.
        let dropped = Answer {
            under: (2, 3),
            ..dropped
        };
        assert_eq!(
            choose(&c, &[dropped, at(&b, (2, 1), Some(b"b2"))]).state,
            None
        );
    }
}
