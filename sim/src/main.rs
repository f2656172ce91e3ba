//! `shoal-sim`: runs simulated Shoal clusters. Needs the simulated build; see README.md.

#[cfg(madsim)]
mod cli;

/// mimalloc, not the system allocator: a thousand-member run spends about a third of its host
/// time allocating and freeing (glibc's malloc, its free-list consolidation and fresh pages
/// zeroed by the kernel; docs/simulation.md, "Where the time goes"). The harness's choice
/// only: the library leaves the allocator to its users.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(madsim)]
/// mimalloc v3's `mi_option_purge_delay` (its index in `mi_option_e`, libmimalloc-sys 0.1.49).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[cfg(madsim)]
/// Memory a run freed is kept a second before it goes back to the kernel (mimalloc's default:
/// 10 ms). A thousand-member run frees and allocates gigabytes; given back at once, each
/// reuse faults in fresh pages the kernel zeroes (a huge page at a time): 12% of the host time
/// at 1,000 members, 15% of the wall time at 300.
fn keep_freed_memory_a_while() {
    // SAFETY: plain setters of mimalloc's process-wide options, valid from any thread at any
    // time; the index is checked against the option's documented default first.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == 10 {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
        }
    }
}

#[cfg(madsim)]
fn main() -> std::process::ExitCode {
    keep_freed_memory_a_while();
    cli::main()
}

#[cfg(not(madsim))]
fn main() -> std::process::ExitCode {
    eprintln!(
        "shoal-sim runs only in the simulated build:\n  RUSTFLAGS=\"--cfg madsim\" CARGO_TARGET_DIR=target/sim cargo run --release -p shoal-sim -- run"
    );
    std::process::ExitCode::from(2)
}
