# Sourced by the scripts: the simulated build's flags and target dir (kept apart from the normal
# build because the cfg changes every fingerprint).
export SIM_RUSTFLAGS="--cfg madsim"
sim() {
    RUSTFLAGS="${RUSTFLAGS:-} $SIM_RUSTFLAGS" RUSTDOCFLAGS="${RUSTDOCFLAGS:-} $SIM_RUSTFLAGS" \
        CARGO_TARGET_DIR="${SIM_TARGET_DIR:-target/sim}" "$@"
}
