//! The package's examples, built by the tests that run them as separate
//! processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// An example of this package (`examples/<name>.rs`), built once per test
/// binary and name with the same cargo, profile and target dir as the test
/// binary; returns the executable's path.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    built
        .entry(name.to_owned())
        .or_insert_with(|| build_example(name))
        .clone()
}

/// Builds an example of this package once (per name) with the same cargo,
/// profile and target dir as this test binary, and returns its path (from
/// cargo's own JSON report, so CARGO_TARGET_DIR and friends are respected).
fn build_example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<this test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target dir");
    let mut command = Command::new(env!("CARGO"));
    // Cargo sets these for the test process; some build scripts (ring's)
    // watch CARGO_MANIFEST_DIR, so passing them on would make this build
    // (and the next ordinary one) recompile half the dependency tree.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                &*key,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            )
        {
            command.env_remove(&*key);
        }
    }
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--example", name])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        command.arg("--release");
    }
    let output = command.output().expect("running cargo build");
    assert!(
        output.status.success(),
        "cargo build --example {name} failed ({})",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo did not report the executable of example {name}"))
}
