//! Generates the gRPC code for both worlds: `madsim-tonic-build` writes the real tonic code to
//! `OUT_DIR` and the simulated one to `OUT_DIR/sim`; `tonic::include_proto!` picks the right one.
//! protoc comes from `protoc-bin-vendored`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/shoal/registry/v1/registry.proto",
        "proto/shoal/partition/v1/partition.proto",
    ];
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Maps as BTreeMap: iteration order reaches the output and the network.
    config.btree_map(["."]);
    // Shared, reference-counted bytes: one encoded snapshot serves every watcher.
    config.bytes([".shoal.registry.v1.Snapshot.packed_members"]);
    tonic_build::configure().compile_protos_with_config(config, &protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
