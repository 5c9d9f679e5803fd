//! Fuzzes the ONNX loader: any bytes must give a model or an error, never a panic, and a
//! model that loads must verify, re-encode, and load again to the same encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.onnx");
    // External data is resolved against a folder that does not exist, so references to it
    // exercise the error path without touching the disk.
    let base = Path::new("/nonexistent-perqc-fuzz");
    let Ok(loaded) = perqc_onnx::load_bytes(bytes::Bytes::copy_from_slice(data), path, base) else {
        return;
    };
    perqc_ir::verify::verify(&loaded.model).expect("a loaded model verifies");
    let encoded = perqc_onnx::to_bytes(&loaded.model);
    let again = perqc_onnx::load_bytes(encoded.clone().into(), path, base).expect("re-encoded model loads");
    assert_eq!(perqc_onnx::to_bytes(&again.model), encoded, "encoding is a fixed point");
});
