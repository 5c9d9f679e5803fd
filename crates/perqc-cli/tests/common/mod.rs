//! Helpers shared by the CLI's integration tests.

use std::path::{Path, PathBuf};

/// A file of the repository's `fixtures/` folder.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// A fresh, empty folder `<target tmp>/<suite>/<test>`.
pub fn scratch(suite: &str, test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(suite)
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Registers `candidate` for the ONNX Runtime conformance run (`scripts/check`): onnx's
/// checker accepts it and its outputs on random inputs are within `rtol` of the max
/// |output| of `reference`'s (an exact transform, equal up to float round-off).
#[allow(dead_code)]
pub fn close_case(name: &str, reference: &Path, candidate: &Path, rtol: f64) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    std::fs::create_dir_all(&dir).unwrap();
    let abs = |p: &Path| std::fs::canonicalize(p).expect("model exists");
    let json = format!(
        "{{\"cases\": [{{\"name\": {name:?}, \"reference\": {:?}, \"candidate\": {:?}, \"mode\": \"close\", \"rtol\": {rtol}, \"check\": true, \"run\": true}}]}}\n",
        abs(reference),
        abs(candidate),
    );
    std::fs::write(dir.join(format!("{name}.json")), json).unwrap();
}
