//! What the `ticketlock` binary says when things go wrong: a store that
//! fails is exit 3 (never "invariant broken"), SIGTERM cleans up like SIGINT,
//! nothing `simulate` writes lives for ever, TICKET_LOCK_LIFETIME means the
//! same on every backend, and no malformed `--redis` shows its secret.

mod support;

use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use support::RedisServer;

fn ticketlock() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ticketlock"));
    command
        .env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .env_remove("TICKET_LOCK_LIFETIME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = ticketlock();
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("running ticketlock")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One line on stderr, ours.
fn one_error_line(out: &Output) -> String {
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr: {stderr}");
    assert!(lines[0].starts_with("ticketlock: "), "{stderr}");
    stderr
}

/// A simulate run long enough to be caught in the middle (about 10 s).
fn long_simulate(url: &str, processes: &str) -> Child {
    ticketlock()
        .args([
            "simulate",
            "--redis",
            url,
            "--processes",
            processes,
            "--conversations",
            "4",
            "--messages",
            "5000",
            "--hold",
            "2",
            "--json",
        ])
        .spawn()
        .expect("starting ticketlock simulate")
}

/// Waits for `child`, at most `limit`; returns its output and how long it took.
fn finish(mut child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    loop {
        if child.try_wait().expect("waiting").is_some() {
            return (child.wait_with_output().expect("output"), started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "still running after {limit:?}; stderr: {}",
                text(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to a process this test started.
fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -s {signal} failed");
}

fn keys(port: u16, pattern: &str) -> Vec<String> {
    support::redis_cli(port, &["--scan", "--pattern", pattern])
        .lines()
        .map(str::to_owned)
        .filter(|k| !k.is_empty())
        .collect()
}

/// Waits until the run has written its first probe keys.
fn wait_until_running(port: u16) {
    support::wait_for("simulate started", Duration::from_secs(20), || {
        if keys(port, "sim:*").is_empty() {
            Err("no sim:* key yet".into())
        } else {
            Ok(())
        }
    });
}

#[test]
fn a_stalled_redis_is_exit_3_with_the_error_not_a_broken_invariant() {
    for processes in ["1", "2"] {
        let server = RedisServer::start();
        let child = long_simulate(&server.url(), processes);
        wait_until_running(server.port());
        thread::sleep(Duration::from_millis(300));
        server.sigstop();
        let stopped = Instant::now();
        // Every call ends within the socket timeout (10 s); cleaning up an
        // abandoned run takes at most 5 s more.
        let (out, _) = finish(child, Duration::from_secs(60));
        let took = stopped.elapsed();
        server.sigcont();
        let stderr = one_error_line(&out);
        assert_eq!(out.status.code(), Some(3), "{processes}: {stderr}");
        assert!(!stderr.contains("invariant"), "{processes}: {stderr}");
        assert!(
            stderr.contains("the store failed") || stderr.contains("child process"),
            "{processes}: {stderr}"
        );
        assert!(stderr.contains("timed out"), "{stderr}");
        assert!(
            took < Duration::from_secs(18),
            "{processes}: exit 3 after {took:?}"
        );
        eprintln!("--processes {processes}: exit 3 {took:?} after SIGSTOP: {stderr}");
    }
}

#[test]
fn sigterm_cleans_up_like_sigint() {
    for (sig, code, word) in [("TERM", 143, "terminated"), ("INT", 130, "interrupted")] {
        let server = RedisServer::start();
        let port = server.port();
        let child = long_simulate(&server.url(), "1");
        wait_until_running(port);
        signal(&child, sig);
        let (out, took) = finish(child, Duration::from_secs(30));
        let stderr = one_error_line(&out);
        assert_eq!(out.status.code(), Some(code), "SIG{sig}: {stderr}");
        assert!(stderr.contains(word), "SIG{sig}: {stderr}");
        assert!(took < Duration::from_secs(10), "SIG{sig}: took {took:?}");
        assert_eq!(keys(port, "sim:*"), Vec::<String>::new(), "SIG{sig}");
        assert_eq!(keys(port, "lock:*"), Vec::<String>::new(), "SIG{sig}");
    }
}

#[test]
fn every_key_simulate_writes_expires_even_when_it_is_killed() {
    let server = RedisServer::start();
    let port = server.port();
    let mut child = long_simulate(&server.url(), "1");
    wait_until_running(port);
    thread::sleep(Duration::from_millis(500));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let sim = keys(port, "sim:*");
    assert!(!sim.is_empty(), "nothing left to check");
    for key in sim.iter().chain(&keys(port, "lock:*")) {
        let pttl: i64 = support::redis_cli(port, &["PTTL", key])
            .parse()
            .expect("PTTL");
        // -2: gone meanwhile (fine); -1: would live for ever.
        assert!(pttl != -1, "{key} has no expiry");
    }
}

#[test]
fn ticket_lock_lifetime_is_read_and_checked_on_every_backend() {
    let server = RedisServer::start();
    let url = server.url();
    let memory: &[&str] = &["simulate", "--messages", "5", "--json"];
    let redis: &[&str] = &["simulate", "--messages", "5", "--json", "--redis", &url];
    for args in [memory, redis] {
        let out = run(args, &[("TICKET_LOCK_LIFETIME", "abc")]);
        let stderr = one_error_line(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("TICKET_LOCK_LIFETIME"), "{stderr}");

        // A valid value is the locks' lease unless --lifetime says otherwise.
        let out = run(args, &[("TICKET_LOCK_LIFETIME", "7.5")]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["lifetime_s"], 7.5, "{v}");
        let mut with_flag = args.to_vec();
        with_flag.extend(["--lifetime", "3"]);
        let out = run(&with_flag, &[("TICKET_LOCK_LIFETIME", "7.5")]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["lifetime_s"], 3.0, "{v}");
    }
}

#[test]
fn the_lifetime_help_describes_the_lease() {
    let out = run(&["simulate", "--help"], &[]);
    let help = text(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(help.contains("counted from the grant"), "{help}");
    assert!(help.contains("TICKET_LOCK_LIFETIME"), "{help}");
    assert!(!help.contains("waiting included"), "{help}");
    assert!(help.contains("143"), "SIGTERM's exit code: {help}");
}

#[test]
fn host_port_without_a_scheme_is_the_same_clear_error_everywhere() {
    let mut errors = Vec::new();
    for args in [
        &["simulate", "--redis", "127.0.0.1:6379"][..],
        &["inspect", "x", "--redis", "127.0.0.1:6379"][..],
        &["scripts", "load", "--redis", "127.0.0.1:6379"][..],
    ] {
        let out = run(args, &[]);
        let stderr = one_error_line(&out);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(stderr.contains("redis://"), "{stderr}");
        errors.push(stderr);
    }
    assert!(errors.windows(2).all(|w| w[0] == w[1]), "{errors:#?}");
}

/// A `--redis` value with `secret` planted where a password goes, mangled.
/// Hosts are loopback addresses or unparsable (nothing is looked up in DNS).
fn planted(secret: &'static str) -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec![
        "redis://",
        "rediss://",
        "redis//",
        "redis:",
        "http://",
        "",
        "redis+sentinel://",
        "redis+cluster://",
        "://",
    ]);
    let userinfo = prop::sample::select(vec![
        "user:{s}@",
        ":{s}@",
        "{s}@",
        "user:{s}",
        "us@er:{s}@",
        "user:{s}/@",
        "user:{s}#@",
    ]);
    let host = prop::sample::select(vec![
        "127.0.0.1:1",
        "127.0.0.1:notaport",
        "[::1",
        "127.0.0.1:1,127.0.0.1:2",
        "",
        "127.0.0.1:0",
    ]);
    let tail = prop::sample::select(vec!["", "/0", "/x", "/svc", "#insecure", "?a=b"]);
    (scheme, userinfo, host, tail).prop_map(move |(scheme, userinfo, host, tail)| {
        format!("{scheme}{}{host}{tail}", userinfo.replace("{s}", secret))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Every subcommand that takes --redis, with and without --json: the
    /// secret is on neither stdout nor stderr, and the error is one line.
    #[test]
    fn no_malformed_redis_url_shows_its_secret(url in planted("S3CRETpw")) {
        for (args, json) in [
            (vec!["simulate", "--messages", "3"], false),
            (vec!["simulate", "--messages", "3", "--json"], true),
            (vec!["inspect", "conv"], false),
            (vec!["inspect", "conv", "--json"], true),
            (vec!["scripts", "load"], false),
            (vec!["scripts", "load", "--json"], true),
        ] {
            // Both ways in: the flag, and REDIS_URL.
            let mut flag = args.clone();
            flag.extend(["--redis", url.as_str()]);
            for (argv, env) in [(flag, vec![]), (args.clone(), vec![("REDIS_URL", url.as_str())])] {
                let out = run(&argv, &env);
                let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
                prop_assert!(!stdout.contains("S3CRET"), "{argv:?} {url:?}: {stdout}");
                prop_assert!(!stderr.contains("S3CRET"), "{argv:?} {url:?}: {stderr}");
                prop_assert!(!stderr.contains("panicked"), "{stderr}");
                if !out.status.success() {
                    prop_assert_eq!(stderr.lines().count(), 1, "{:?} {:?} ({}): {}", argv, url, json, stderr);
                }
            }
        }
    }
}
