//! The one place where the product knows it may be simulated: fault points and planted flaws.
//!
//! Both are compiled to `false` in the normal build, so production code pays nothing for them.
//! In the simulated build (`--cfg madsim`):
//!
//! * [`buggify`] is madsim's buggify (FoundationDB's BUGGIFY): when the harness enables it for a
//!   seed, a fault point fires with the given probability, making rare timings (a late sweep, a
//!   slow snapshot) frequent.
//! * [`flaw`] says whether a named one-line defect is planted in this run. The harness plants one
//!   (`shoal-sim run --flaw NAME`) to prove that its checkers catch a realistic bug in the real
//!   code; every simulated run of a thread sees the same set.

/// Whether a fault point fires (never in the normal build).
#[inline]
pub fn buggify(probability: f64) -> bool {
    #[cfg(madsim)]
    {
        madsim::buggify::buggify_with_prob(probability)
    }
    #[cfg(not(madsim))]
    {
        let _ = probability;
        false
    }
}

/// Whether self-checks (invariant assertions after every mutation) run: in debug builds and in
/// every simulated run, release campaigns included; never in a release build of the product.
#[inline]
pub const fn self_checks() -> bool {
    cfg!(any(debug_assertions, madsim))
}

/// Whether the defect `name` is planted in this simulated run (never in the normal build).
#[inline]
pub fn flaw(name: &'static str) -> bool {
    #[cfg(madsim)]
    {
        PLANTED.with(|p| p.borrow().contains(&name))
    }
    #[cfg(not(madsim))]
    {
        let _ = name;
        false
    }
}

/// Plants the defects `names` for simulated runs on this thread (the harness calls this before
/// a run; an empty list removes them).
#[cfg(madsim)]
pub fn plant_flaws(names: &[&'static str]) {
    PLANTED.with(|p| *p.borrow_mut() = names.to_vec());
}

#[cfg(madsim)]
thread_local! {
    // One simulated run executes on one OS thread, so a thread-local set is per run.
    static PLANTED: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
}
