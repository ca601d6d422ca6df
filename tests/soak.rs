//! A 30-second soak (`examples/soak.rs`): 4 worker processes over 1,000
//! conversations, a worker SIGKILLed every 5 s, the lock server killed and
//! restarted once. It must end with zero exclusion and order violations, no
//! key left behind and Redis memory back near its baseline.
//! (`scripts/soak.sh` runs the same for 300 s, in release mode.)
//!
//! The soak starts its own redis-servers (on 127.0.0.1, stopped by pid), so
//! it needs `redis-server` on PATH but not the harness.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Builds an example of this package with the same cargo, profile and
/// target dir as this test binary and returns its path (from cargo's JSON
/// report, so CARGO_TARGET_DIR and friends are respected).
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

#[test]
fn a_30_second_soak_with_kills_and_a_restart_breaks_nothing_and_leaves_nothing() {
    let soak = build_example("soak");
    let mut child = Command::new(&soak)
        .args(["--seconds", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the soak");
    let output = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let output = output.clone();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("{line}");
                output.lock().unwrap().push(line);
            }
        })
    };
    // 30 s of work, a few seconds of waiting for keys to expire, and slack
    // for a loaded machine; then it is killed (by its pid).
    let deadline = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the soak") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the soak did not finish within 150 s:\n{}",
                output.lock().unwrap().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    reader.join().expect("reader thread");
    let lines = output.lock().unwrap().clone();
    let text = lines.join("\n");
    assert!(status.success(), "the soak failed ({status}):\n{text}");
    for zero in [
        "soak: exclusion violations: 0",
        "soak: order violations: 0",
        "soak: keys left with the prefix: 0 ",
        "soak: result: ok",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(zero)),
            "no line {zero:?}:\n{text}"
        );
    }
    let summary: serde_json::Value = lines
        .iter()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary:\n{text}"));
    assert_eq!(summary["exclusion_violations"], 0, "{text}");
    assert_eq!(summary["order_violations"], 0, "{text}");
    assert_eq!(summary["keys_left"], 0, "{text}");
    assert_eq!(summary["workers_killed"], 5, "{text}");
    assert!(
        summary["released_in_time"].as_u64().unwrap_or(0) > 1000,
        "too few sections: {text}"
    );
    assert!(
        summary["used_memory_growth"].as_i64().unwrap_or(i64::MAX) <= 256 * 1024,
        "{text}"
    );
}
