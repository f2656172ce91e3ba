//! `shoal-sim`: runs simulated Shoal clusters. Needs the simulated build; see README.md.

#[cfg(madsim)]
mod cli;

#[cfg(madsim)]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(not(madsim))]
fn main() -> std::process::ExitCode {
    eprintln!(
        "shoal-sim runs only in the simulated build:\n  RUSTFLAGS=\"--cfg madsim\" CARGO_TARGET_DIR=target/sim cargo run --release -p shoal-sim -- run"
    );
    std::process::ExitCode::from(2)
}
