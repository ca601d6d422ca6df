//! The `ticketlock` binary, run as a user would: exit codes, one-line errors,
//! and `simulate` proving FIFO order and mutual exclusion, in memory and
//! across processes sharing a real Redis.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// What a finished run left behind.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {self:#?}"))
    }

    /// Exactly one line on stderr, ours, and no panic.
    fn assert_one_error_line(&self) {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:#?}");
        assert!(lines[0].starts_with("ticketlock: "), "{self:#?}");
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
        assert!(!self.stderr.contains("RUST_BACKTRACE"), "{self:#?}");
    }
}

/// Runs the binary with a clean environment (no REDIS_URL, RUST_LOG or
/// TICKET_LOCK_LIFETIME from the caller) and kills it after `limit`.
fn ticketlock(args: &[&str], limit: Duration) -> Run {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ticketlock"))
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .env_remove("TICKET_LOCK_LIFETIME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ticketlock");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for ticketlock") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ticketlock {args:?} still running after {limit:?}; stderr so far:\n{}",
                err.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
        took: started.elapsed(),
    }
}

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(180);

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

/// Every invariant held and everything was handled.
fn assert_clean(run: &Run, expected: u64) -> Value {
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stderr.is_empty(),
        "stderr should be empty with --json: {run:#?}"
    );
    let v = run.json();
    assert_eq!(u(&v, "messages"), expected, "{v}");
    assert_eq!(u(&v, "handled"), expected, "{v}");
    for key in ["order_violations", "overlaps", "lost_updates", "errors"] {
        assert_eq!(u(&v, key), 0, "{key} in {v}");
    }
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    assert_eq!(u(&v["wait_ms"], "samples"), expected, "{v}");
    v
}

fn redis_keys(url: &str, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_connection()
        .expect("connecting to the test redis");
    redis::cmd("KEYS")
        .arg(pattern)
        .query(&mut conn)
        .expect("KEYS")
}

/// Neither the lock's keys (under `prefix`) nor the probes' keys are left.
fn assert_no_keys_left(url: &str, prefix: &str, summary: &Value) {
    let run_id = summary["run_id"].as_str().expect("run_id in the summary");
    assert!(!run_id.is_empty());
    let left = redis_keys(url, &format!("{prefix}:*"));
    assert!(left.is_empty(), "lock keys left behind: {left:?}");
    let left = redis_keys(url, &format!("sim:{run_id}:*"));
    assert!(left.is_empty(), "probe keys left behind: {left:?}");
    let left = redis_keys(url, &format!("*sim-{run_id}-*"));
    assert!(left.is_empty(), "keys of the run left behind: {left:?}");
}

#[test]
fn in_memory_run_keeps_order_and_exclusion() {
    let run = ticketlock(
        &[
            "simulate",
            "--conversations",
            "3",
            "--messages",
            "50",
            "--workers",
            "8",
            "--json",
        ],
        SHORT,
    );
    let v = assert_clean(&run, 150);
    assert_eq!(v["backend"], "memory");
    assert_eq!(u(&v, "workers"), 8);
    assert_eq!(u(&v, "processes"), 1);
    assert!(v["elapsed_s"].as_f64().is_some_and(|s| s >= 0.0), "{v}");
    assert!(v["wait_ms"]["p50"].is_number(), "{v}");
}

#[test]
fn in_memory_table_goes_to_stdout() {
    let run = ticketlock(
        &["simulate", "--conversations", "2", "--messages", "20"],
        SHORT,
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    for row in [
        "messages handled        40 / 40",
        "order violations        0",
        "overlapping sections    0",
        "lost updates            0",
        "lock errors             0",
        "throughput",
        "wait time (ms)",
        "hand-off latency (ms)",
        "OK",
    ] {
        assert!(run.stdout.contains(row), "no {row:?} in:\n{}", run.stdout);
    }
    // Not a terminal: no progress bar, nothing else on stderr.
    assert!(run.stderr.is_empty(), "{run:#?}");
}

/// The checks themselves work: without the lock every invariant breaks.
#[test]
fn checks_catch_a_run_without_the_lock() {
    let run = ticketlock(
        &[
            "simulate",
            "--conversations",
            "1",
            "--messages",
            "100",
            "--workers",
            "8",
            "--hold",
            "1",
            "--no-lock",
            "--json",
        ],
        SHORT,
    );
    assert_eq!(run.code, Some(1), "{run:#?}");
    run.assert_one_error_line();
    assert!(run.stderr.contains("invariant broken"), "{run:#?}");
    let v = run.json();
    assert_eq!(v["ok"], Value::Bool(false));
    assert!(u(&v, "overlaps") > 0, "{v}");
    assert!(u(&v, "lost_updates") > 0, "{v}");
    assert!(u(&v, "order_violations") > 0, "{v}");
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    let cases: &[&[&str]] = &[
        &["simulate", "--workers", "0"],
        &["simulate", "--processes", "2"],
        &["simulate", "--lifetime", "-1"],
        &["simulate", "--lifetime", "NaN"],
        &["simulate", "--lifetime", "0"],
        &["simulate", "--lifetime", "inf"],
        &["simulate", "--conversations", "0"],
        &["simulate", "--messages", "x"],
        &["simulate", "--no-such-flag"],
        &[
            "simulate",
            "--key-prefix",
            "a:b",
            "--redis",
            "redis://127.0.0.1:1",
        ],
        &["simulate", "--key-prefix", "abc"],
        &["simulate", "--child", "0", "--run-id", "x"],
    ];
    for args in cases {
        let run = ticketlock(args, SHORT);
        assert_eq!(run.code, Some(2), "{args:?}: {run:#?}");
        run.assert_one_error_line();
        assert!(run.stdout.is_empty(), "{args:?}: {run:#?}");
    }
}

#[test]
fn hostile_input_on_every_command_is_one_line_and_exit_2() {
    // An argument can be at most 128 KiB on Linux; the library's own tests
    // cover a 1 MiB id.
    let long_id = "x".repeat(100 * 1024);
    let cases: Vec<Vec<&str>> = vec![
        vec!["simulate", "--lifetime", "1e30"],
        vec!["simulate", "--lifetime", "-inf"],
        vec!["simulate", "--hold", "-1"],
        vec!["inspect", "", "--redis", "redis://127.0.0.1:1"],
        vec!["inspect", &long_id, "--redis", "redis://127.0.0.1:1"],
        vec![
            "inspect",
            "c",
            "--key-prefix",
            "a-b",
            "--redis",
            "redis://127.0.0.1:1",
        ],
        vec!["inspect", "c"],
        vec!["scripts", "show", "no-such-script"],
    ];
    for args in &cases {
        let run = ticketlock(args, SHORT);
        assert_eq!(run.code, Some(2), "{:.80?}: {run:#?}", args);
        run.assert_one_error_line();
        assert!(!run.stderr.contains("panicked"), "{run:#?}");
        assert!(
            run.stderr.len() < 600,
            "the error repeats the input: {} bytes",
            run.stderr.len()
        );
    }
}

#[test]
fn help_documents_the_exit_codes() {
    for args in [&["--help"][..], &["simulate", "--help"][..]] {
        let run = ticketlock(args, SHORT);
        assert_eq!(run.code, Some(0), "{run:#?}");
        assert!(run.stdout.contains("Exit codes:"), "{run:#?}");
        for code in ["  0 ", "  1 ", "  2 ", "  3 "] {
            assert!(run.stdout.contains(code), "{code:?} in {}", run.stdout);
        }
    }
    let run = ticketlock(&["simulate", "--help"], SHORT);
    for flag in [
        "--workers",
        "--processes",
        "--conversations",
        "--messages",
        "--hold",
        "--lifetime",
        "--redis",
        "--key-prefix",
        "--json",
        "--verbose",
    ] {
        assert!(run.stdout.contains(flag), "{flag} in {}", run.stdout);
    }
    assert!(!run.stdout.contains("--child"), "internal flag shown");
}

#[test]
fn unreachable_redis_exits_3_quickly_without_leaking_the_password() {
    for url in ["redis://127.0.0.1:1", "redis://user:s3cret@127.0.0.1:1/0"] {
        for processes in ["1", "3"] {
            let run = ticketlock(
                &["simulate", "--redis", url, "--processes", processes],
                Duration::from_secs(30),
            );
            assert_eq!(run.code, Some(3), "{url}: {run:#?}");
            run.assert_one_error_line();
            assert!(run.stderr.contains("cannot connect"), "{run:#?}");
            assert!(run.stderr.contains("127.0.0.1:1"), "{run:#?}");
            assert!(!run.stderr.contains("s3cret"), "password shown: {run:#?}");
            assert!(run.took < Duration::from_secs(30), "{run:#?}");
        }
    }
}

#[test]
fn malformed_url_exits_3() {
    for url in ["http://x", "redis://:s3cret@h:notaport"] {
        let run = ticketlock(&["simulate", "--redis", url], SHORT);
        assert_eq!(run.code, Some(3), "{url}: {run:#?}");
        run.assert_one_error_line();
        assert!(run.stderr.contains("url"), "{run:#?}");
        assert!(!run.stderr.contains("s3cret"), "password shown: {run:#?}");
    }
}

/// Four processes, 200 handlers each, one conversation: up to 800 tickets
/// queued at once on one queue in Redis.
#[test]
fn four_processes_share_one_queue_in_fifo_order() {
    let url = support::redis_url();
    let prefix = support::unique_prefix("cli");
    let run = ticketlock(
        &[
            "simulate",
            "--processes",
            "4",
            "--conversations",
            "1",
            "--messages",
            "800",
            "--workers",
            "200",
            "--redis",
            &url,
            "--key-prefix",
            &prefix,
            "--json",
        ],
        LONG,
    );
    let v = assert_clean(&run, 800);
    assert_eq!(v["backend"], "redis");
    assert_eq!(u(&v, "processes"), 4);
    assert_eq!(v["key_prefix"].as_str(), Some(prefix.as_str()));
    assert!(u(&v["handoff_ms"], "samples") > 0, "{v}");
    assert_no_keys_left(&url, &prefix, &v);
}

#[test]
fn two_processes_many_conversations_with_hold() {
    let url = support::redis_url();
    let prefix = support::unique_prefix("cli");
    let run = ticketlock(
        &[
            "simulate",
            "--processes",
            "2",
            "--conversations",
            "8",
            "--messages",
            "50",
            "--workers",
            "16",
            "--hold",
            "1",
            "--redis",
            &url,
            "--key-prefix",
            &prefix,
            "--json",
        ],
        LONG,
    );
    let v = assert_clean(&run, 400);
    assert_eq!(u(&v, "hold_ms"), 1);
    assert_no_keys_left(&url, &prefix, &v);
}

/// The Redis-side probes catch processes that skip the lock.
#[test]
fn checks_catch_processes_without_the_lock() {
    let url = support::redis_url();
    let prefix = support::unique_prefix("cli");
    let run = ticketlock(
        &[
            "simulate",
            "--processes",
            "2",
            "--conversations",
            "1",
            "--messages",
            "100",
            "--workers",
            "10",
            "--hold",
            "1",
            "--redis",
            &url,
            "--key-prefix",
            &prefix,
            "--no-lock",
            "--json",
        ],
        LONG,
    );
    assert_eq!(run.code, Some(1), "{run:#?}");
    run.assert_one_error_line();
    let v = run.json();
    assert!(u(&v, "overlaps") > 0, "{v}");
    assert!(u(&v, "lost_updates") > 0, "{v}");
    assert_no_keys_left(&url, &prefix, &v);
}

/// The URL can come from REDIS_URL, and the default key prefix is `lock:`.
#[test]
fn redis_url_from_the_environment() {
    let url = support::redis_url();
    let run = {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_ticketlock"))
            .args(["simulate", "-c", "2", "-m", "30", "-w", "4", "--json"])
            .env("REDIS_URL", &url)
            .env_remove("RUST_LOG")
            .env_remove("TICKET_LOCK_LIFETIME")
            .stdin(Stdio::null())
            .output()
            .expect("running ticketlock");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        }
    };
    let v = assert_clean(&run, 60);
    assert_eq!(v["backend"], "redis");
    let run_id = v["run_id"].as_str().expect("run_id");
    let left = redis_keys(&url, &format!("lock:{{sim-{run_id}-*"));
    assert!(left.is_empty(), "lock keys left behind: {left:?}");
}
