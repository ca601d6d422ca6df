//! A 30-second soak (`examples/soak.rs`): 4 worker processes over 1,000
//! conversations, a worker SIGKILLed every 5 s, the lock server killed and
//! restarted once. It must end with zero exclusion and order violations, no
//! key left behind and Redis memory back near its baseline.
//! (`scripts/soak.sh` runs the same for 300 s, in release mode.)
//!
//! The soak starts its own redis-servers (on 127.0.0.1, stopped by pid), so
//! it needs `redis-server` on PATH but not the harness.

mod support;

use std::io::{BufRead, BufReader};

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn a_30_second_soak_with_kills_and_a_restart_breaks_nothing_and_leaves_nothing() {
    let soak = support::example_binary("soak");
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
