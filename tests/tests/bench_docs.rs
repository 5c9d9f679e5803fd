//! The docs and scripts work from a clone: nothing points into a workspace outside the
//! repository, every doc that measures on the real-model bench says how to build it
//! (`scripts/bench-setup`), and the bench scripts parse. Nothing here downloads anything.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Text files under `dir` (recursively), skipping build output, virtual environments, fuzz
/// corpora and other dot- or generated folders.
fn text_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !(name.starts_with('.')
                || ["target", "corpus", "artifacts", "__pycache__"].contains(&name.as_str()))
            {
                text_files(&p, out);
            }
        } else if std::fs::read_to_string(&p).is_ok() {
            out.push(p);
        }
    }
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

#[test]
fn nothing_points_outside_the_repository() {
    let root = root();
    let mut files = vec![root.join("README.md")];
    for d in [
        "docs", "scripts", "crates", "tests", "python", "tools", "fixtures", "passes", "fuzz",
    ] {
        text_files(&root.join(d), &mut files);
    }
    let this_file = Path::new(file!()).file_name().unwrap();
    // Spelled in pieces so that this file does not match itself.
    let needles = [
        format!("../{}", "shared"),
        format!("shared/{}", "bench"),
        format!("/work/{}", ""),
    ];
    let mut bad = Vec::new();
    for f in &files {
        if f.file_name() == Some(this_file) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            for n in &needles {
                if line.contains(n.as_str()) {
                    bad.push(format!("{}:{}: {n}", rel(f), i + 1));
                }
            }
        }
    }
    assert!(files.len() > 50, "found only {} files", files.len());
    assert!(
        bad.is_empty(),
        "references to files outside the repository:\n{}",
        bad.join("\n")
    );
}

#[test]
fn docs_that_use_the_bench_say_how_to_build_it() {
    let mut docs = vec![root().join("README.md")];
    text_files(&root().join("docs"), &mut docs);
    let mut using = 0;
    for d in &docs {
        let text = std::fs::read_to_string(d).unwrap();
        let machine = format!("this {}", "machine");
        assert!(
            !text.contains(&machine),
            "{}: says '{machine}'; state what was measured on, or what is needed",
            rel(d)
        );
        if text.contains("perqc-bench") || text.contains("$B/") {
            using += 1;
            assert!(
                text.contains("scripts/bench-setup"),
                "{} measures on the bench but never names scripts/bench-setup",
                rel(d)
            );
        }
    }
    assert!(using >= 4, "only {using} docs use the bench");
}

#[test]
fn bench_scripts_parse() {
    let root = root();
    let scripts = root.join("scripts");
    for s in [
        "bench-setup",
        "bench/build_genai.sh",
        "roundtrip_real.sh",
        "check",
        "setup-python",
    ] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(scripts.join(s))
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "bash -n scripts/{s}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // --help prints the usage and touches nothing (no folder, no download).
    let out = Command::new(scripts.join("bench-setup"))
        .arg("--help")
        .env(
            "PERQC_BENCH_DIR",
            root.join("target/tmp/bench-must-not-exist"),
        )
        .output()
        .expect("scripts/bench-setup");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && help.contains("usage: scripts/bench-setup"),
        "{help}"
    );
    assert!(!root.join("target/tmp/bench-must-not-exist").exists());

    // The Python helpers parse, with the Python the test suite installs (scripts/setup-python).
    let venv = root.join(".venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(scripts.join("bench"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "py"))
        .collect();
    files.push(scripts.join("bench_runtime.py"));
    assert!(files.len() >= 5, "{files:?}");
    match Command::new(&python)
        .arg("-c")
        .arg("import ast, sys\nfor f in sys.argv[1:]: ast.parse(open(f).read(), f)")
        .args(&files)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("skipped the Python syntax check: {}: {e}", python.display()),
    }
}

/// The bench's ONNX Runtime and the test suite's oracle are the same versions, so the ppl and
/// speed figures of docs/ compare with what CI checks.
#[test]
fn bench_pins_match_the_test_oracle() {
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    let bench = read("scripts/bench/requirements.txt");
    for pin in read("python/requirements.txt").lines() {
        let pin = pin.trim();
        if pin.is_empty() || pin.starts_with('#') {
            continue;
        }
        let name = pin.split("==").next().unwrap();
        if let Some(b) = bench.lines().find(|l| l.split("==").next() == Some(name)) {
            assert_eq!(
                b.trim(),
                pin,
                "scripts/bench/requirements.txt vs python/requirements.txt"
            );
        }
    }
}
