//! The install step and the lean release build stay in place: the README says how to put
//! `perqc` on the PATH, the release profile ships no debug info (line tables made 50 of the
//! binary's 58 MB), and a `profiling` profile keeps them for profilers.

use std::path::Path;

fn repo_file(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `key = value` lines of `[section]` in a TOML file.
fn section(toml: &str, name: &str) -> Vec<String> {
    let header = format!("[{name}]");
    toml.lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .map(|l| l.split('#').next().unwrap().trim().replace(' ', ""))
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn readme_has_an_install_command() {
    assert!(repo_file("README.md").contains("cargo install --locked --path crates/perqc-cli"));
}

#[test]
fn release_is_lean_and_profiling_keeps_line_tables() {
    let toml = repo_file("Cargo.toml");
    let release = section(&toml, "profile.release");
    assert!(
        release.iter().any(|l| l == "debug=false"),
        "release keeps debug info: {release:?}"
    );
    let profiling = section(&toml, "profile.profiling");
    for want in [
        "inherits=\"release\"",
        "debug=\"line-tables-only\"",
        "strip=\"none\"",
    ] {
        assert!(profiling.iter().any(|l| l == want), "{want}: {profiling:?}");
    }
}
