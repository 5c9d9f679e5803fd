//! Regenerates the committed ONNX protobuf types.
//!
//! `cargo run -p gen-proto` reads `crates/perqc-onnx/proto/onnx.proto` (the `onnx-ml.proto`
//! shipped in the `onnx` 1.23.2 wheel, proto2 syntax so field presence is kept) and writes
//! `crates/perqc-onnx/src/proto/onnx.rs`. `bytes` fields become `bytes::Bytes`, so tensor
//! payloads decoded from a memory map are zero-copy slices of it.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../crates/perqc-onnx");
    let proto_dir = root.join("proto");
    let out_dir = root.join("src/proto");
    let fds = protox::compile([proto_dir.join("onnx.proto")], [&proto_dir])
        .unwrap_or_else(|e| panic!("compiling onnx.proto: {e}"));
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    config.out_dir(&out_dir);
    config
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating Rust from onnx.proto: {e}"));
    println!("wrote {}", out_dir.join("onnx.rs").display());
}
