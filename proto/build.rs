//! Compiles `proto/runnel/v1/**/*.proto` with `protox`, a pure-Rust protobuf
//! compiler, so that `cargo build` needs no system `protoc`. The encoded
//! descriptor set is also written to `OUT_DIR` for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "runnel/v1/common.proto",
    "runnel/v1/producer.proto",
    "runnel/v1/consumer.proto",
    "runnel/v1/admin.proto",
    "runnel/v1/groups.proto",
    "runnel/v1/security.proto",
    "runnel/v1/internal/replication.proto",
    "runnel/v1/internal/raft.proto",
    "runnel/v1/internal/broker.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set itself: encode it here.
    std::fs::write(out.join("runnel_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".runnel.v1")
        .compile_fds(fds)?;
    Ok(())
}
