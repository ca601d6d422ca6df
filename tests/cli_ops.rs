//! The operator subcommands run as a user would: `inspect` on queues made by
//! the library, `scripts show` / `scripts load` (and other clients calling
//! the loaded scripts by SHA and by function name), exit codes for rejected
//! settings, and `-v` showing the library's events.
//! Long on purpose: each test drives the binary as a user would, one
//! subcommand and outcome per test, with its expected output spelled out.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use ticketlock::{functions_library, lua_scripts, LockStore, StoreConfig, LIBRARY_NAME};

const LIMIT: Duration = Duration::from_secs(60);

/// What a finished run left behind.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:#?}"))
    }

    /// Exactly one line on stderr, ours, and no panic.
    fn assert_one_error_line(&self) {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:#?}");
        assert!(lines[0].starts_with("ticketlock: "), "{self:#?}");
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
    }
}

/// Runs the binary with a clean environment plus `env`, killed after LIMIT.
fn ticketlock_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let started = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ticketlock"));
    command
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .env_remove("TICKET_LOCK_LIFETIME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("starting ticketlock");
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
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ticketlock {args:?} still running after {LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn ticketlock(args: &[&str]) -> Run {
    ticketlock_env(args, &[])
}

/// The same from async tests, off the runtime's threads.
async fn ticketlock_async(args: Vec<String>) -> Run {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ticketlock(&args)
    })
    .await
    .expect("ticketlock runner")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

async fn store(url: &str, prefix: &str) -> LockStore {
    let mut config = StoreConfig::redis(url);
    config.key_prefix = Some(prefix.to_owned());
    LockStore::create(Some(&config))
        .await
        .expect("connecting the library to the test redis")
}

fn connection(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .expect("redis url")
        .get_connection()
        .expect("connecting to the test redis")
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

/// A holder (taken with `lock`, so renewing and picked up) and two waiters
/// (`issue_ticket`, fixed): three tickets in order, the first served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_the_holder_and_the_waiters_in_order() {
    let url = support::redis_url();
    let prefix = support::unique_prefix("inspect");
    let store = store(&url, &prefix).await;
    let cid = "stuck-conversation";
    let guard = store.lock(cid).await.expect("lock");
    let second = store
        .issue_ticket(cid, Duration::from_secs(60))
        .await
        .expect("issue 1");
    let third = store
        .issue_ticket(cid, Duration::from_secs(60))
        .await
        .expect("issue 2");
    assert_eq!((guard.ticket(), second, third), (0, 1, 2));

    let run = ticketlock_async(args(&[
        "inspect",
        cid,
        "--redis",
        &url,
        "--key-prefix",
        &prefix,
        "--json",
    ]))
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.is_empty(), "{run:#?}");
    let v = run.json();
    assert_eq!(v["exists"], true, "{v}");
    assert_eq!(v["conversation_id"], cid, "{v}");
    assert_eq!(u(&v, "depth"), 3, "{v}");
    assert_eq!(u(&v, "next"), 3, "{v}");
    assert_eq!(u(&v, "expired"), 0, "{v}");
    assert!(u(&v, "epoch") > 0, "{v}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");

    let tickets = v["tickets"].as_array().expect("tickets");
    let numbers: Vec<u64> = tickets.iter().map(|t| u(t, "number")).collect();
    assert_eq!(numbers, [0, 1, 2], "{v}");
    let states: Vec<&str> = tickets
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["served", "waiting", "waiting"], "{v}");
    assert_eq!(tickets[0]["kind"], "renewing", "{v}");
    assert!(u(&tickets[0], "lease_ms") > 0, "{v}");
    assert!(u(&tickets[0], "liveness_ms") > 0, "{v}");
    assert_eq!(tickets[0]["deadline"], "lease", "{v}");
    assert!(
        tickets[0]["request"].is_string(),
        "lock's issue carries a request id: {v}"
    );
    for t in &tickets[1..] {
        assert_eq!(t["kind"], "fixed", "{v}");
        let left = t["remaining_ms"].as_i64().expect("remaining_ms");
        assert!(left > 50_000 && left <= 60_000, "{v}");
    }

    let served = &v["served"];
    assert_eq!(u(served, "ticket"), 0, "{v}");
    assert_eq!(served["granted"], true, "{v}");
    assert_eq!(served["held"], true, "{v}");
    assert_eq!(u(served, "fence"), guard.fencing_token(), "{v}");
    assert_eq!(u(&v, "last_fence"), guard.fencing_token(), "{v}");

    let meta = format!("{prefix}:lock:{{{cid}}}");
    assert_eq!(v["key"]["name"], meta.as_str(), "{v}");
    // The latest expiry (the lease, 60 s) plus the 1 s margin.
    assert!(
        v["key"]["pttl_ms"]
            .as_i64()
            .is_some_and(|ms| ms > 55_000 && ms <= 61_000),
        "{v}"
    );

    // The table says the same for humans.
    let run = ticketlock_async(args(&[
        "inspect",
        cid,
        "--redis",
        &url,
        "--key-prefix",
        &prefix,
    ]))
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let fence = guard.fencing_token().to_string();
    for text in [
        "depth         3 live ticket(s)",
        &format!("served        ticket 0, fencing token {fence}, picked up (held)"),
        "record        epoch ",
        "next ticket 3",
        "renewing (lease 60000 ms",
    ] {
        assert!(run.stdout.contains(text), "no {text:?} in:\n{}", run.stdout);
    }
    let rows: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() > 3 && ["0", "1", "2"].contains(&w[0]))
        .collect();
    assert_eq!(rows.len(), 3, "{}", run.stdout);
    for (i, (row, state)) in rows
        .iter()
        .zip(["served", "waiting", "waiting"])
        .enumerate()
    {
        assert_eq!(row[1], i.to_string(), "{}", run.stdout);
        assert_eq!(row[2], state, "{}", run.stdout);
    }
    assert!(
        run.stdout.contains(meta.as_str()),
        "{meta} in {}",
        run.stdout
    );

    guard.release().await.expect("release");
    store.cleanup(cid, 1).await.expect("cleanup 1");
    store.cleanup(cid, 2).await.expect("cleanup 2");
}

/// Ids with braces, `%`, `:` and non-ASCII: inspect reads the keys the
/// library wrote, and a look-alike id is a different conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_finds_the_keys_of_unusual_ids() {
    let url = support::redis_url();
    let prefix = support::unique_prefix("inspect");
    let store = store(&url, &prefix).await;
    let cid = "}a{b%c:d é 会話 🎉";
    let ticket = store
        .issue_ticket(cid, Duration::from_secs(60))
        .await
        .expect("issue");
    assert_eq!(ticket, 0);

    let run = ticketlock_async(args(&[
        "inspect",
        cid,
        "--redis",
        &url,
        "--key-prefix",
        &prefix,
        "--json",
    ]))
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let v = run.json();
    assert_eq!(v["exists"], true, "{v}");
    assert_eq!(v["conversation_id"], cid, "{v}");
    assert_eq!(u(&v, "depth"), 1, "{v}");
    assert_eq!(u(&v["tickets"][0], "number"), 0, "{v}");
    assert_eq!(v["served"]["ticket"], 0, "{v}");
    let meta = format!("{prefix}:lock:{{%7Da%7Bb%25c:d é 会話 🎉}}");
    assert_eq!(v["key"]["name"], meta.as_str(), "{v}");
    // That is the key the library wrote, not merely what inspect expects.
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&meta)
        .query(&mut connection(&url))
        .expect("EXISTS");
    assert_eq!(exists, 1);

    let table = ticketlock_async(args(&[
        "inspect",
        cid,
        "--redis",
        &url,
        "--key-prefix",
        &prefix,
    ]))
    .await;
    assert_eq!(table.code, Some(0), "{table:#?}");
    assert!(table.stdout.contains("会話"), "{}", table.stdout);
    assert!(table.stdout.contains("depth         1 live ticket(s)"));

    // The encoded spelling is another conversation: no record.
    for other in ["%7Da%7Bb%25c:d é 会話 🎉", "}a{b%c:d é 会話"] {
        let run = ticketlock_async(args(&[
            "inspect",
            other,
            "--redis",
            &url,
            "--key-prefix",
            &prefix,
            "--json",
        ]))
        .await;
        assert_eq!(run.code, Some(0), "{run:#?}");
        assert_eq!(run.json()["exists"], false, "{other}: {run:#?}");
    }
    store.cleanup(cid, 0).await.expect("cleanup");
}

/// A holder whose ticket expired blocks nobody: inspect shows it expired and
/// the next ticket due for its grant, then granted once a script ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_expired_tickets_and_a_due_grant() {
    let url = support::redis_url();
    let prefix = support::unique_prefix("inspect");
    let store = store(&url, &prefix).await;
    let cid = "crashed-holder";
    let first = store
        .issue_ticket(cid, Duration::from_millis(300))
        .await
        .expect("issue 0");
    let second = store
        .issue_ticket(cid, Duration::from_secs(60))
        .await
        .expect("issue 1");
    assert_eq!((first, second), (0, 1));
    let inspect = args(&[
        "inspect",
        cid,
        "--redis",
        &url,
        "--key-prefix",
        &prefix,
        "--json",
    ]);
    let v = ticketlock_async(inspect.clone()).await.json();
    assert_eq!(v["served"]["ticket"], 0, "{v}");
    assert_eq!(v["served"]["granted"], true, "{v}");
    let first_fence = u(&v["served"], "fence");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = ticketlock_async(inspect.clone()).await.json();
    assert_eq!(u(&v, "depth"), 1, "{v}");
    assert_eq!(u(&v, "expired"), 1, "{v}");
    assert_eq!(v["tickets"][0]["state"], "expired", "{v}");
    assert!(v["tickets"][0]["remaining_ms"].as_i64().unwrap() < 0, "{v}");
    assert_eq!(v["tickets"][1]["state"], "served", "{v}");
    assert_eq!(v["served"]["ticket"], 1, "{v}");
    assert_eq!(v["served"]["granted"], false, "{v}");
    assert_eq!(v["served"]["fence"], Value::Null, "{v}");
    assert_eq!(u(&v, "last_fence"), first_fence, "{v}");
    let table = ticketlock_async(inspect[..inspect.len() - 1].to_vec()).await;
    assert!(table.stdout.contains("not granted yet"), "{}", table.stdout);
    assert!(table.stdout.contains(" ms ago"), "{}", table.stdout);

    // Any script prunes and grants.
    store.update_lock(cid).await.expect("update");
    let v = ticketlock_async(inspect).await.json();
    assert_eq!(u(&v, "expired"), 0, "{v}");
    assert_eq!(v["tickets"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["served"]["ticket"], 1, "{v}");
    assert_eq!(v["served"]["granted"], true, "{v}");
    assert_eq!(v["served"]["held"], false, "{v}");
    assert!(u(&v["served"], "fence") > first_fence, "{v}");
    store.cleanup(cid, 1).await.expect("cleanup");
}

#[test]
fn inspect_of_an_unknown_conversation_says_no_record() {
    let url = support::redis_url();
    let prefix = support::unique_prefix("inspect");
    let base = [
        "inspect",
        "never-seen",
        "--redis",
        &url,
        "--key-prefix",
        &prefix,
    ];
    let run = ticketlock(&base);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains("no record"), "{run:#?}");
    assert!(run.stderr.is_empty(), "{run:#?}");

    let run = ticketlock(&[&base[..], &["--json"]].concat());
    assert_eq!(run.code, Some(0), "{run:#?}");
    let v = run.json();
    assert_eq!(v["exists"], false, "{v}");
    assert_eq!(u(&v, "depth"), 0, "{v}");
    assert_eq!(v["tickets"], serde_json::json!([]), "{v}");
    assert_eq!(v["key"]["pttl_ms"], Value::Null, "{v}");
}

/// Keys that ticketlock did not write: shown, and exit 1.
#[test]
fn inspect_reports_foreign_data() {
    let url = support::redis_url();
    let prefix = support::unique_prefix("inspect");
    let key = format!("{prefix}:lock:{{foreign}}");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("x")
        .arg("EX")
        .arg(60)
        .query(&mut connection(&url))
        .expect("SET");
    let run = ticketlock(&[
        "inspect",
        "foreign",
        "--redis",
        &url,
        "--key-prefix",
        &prefix,
        "--json",
    ]);
    assert_eq!(run.code, Some(1), "{run:#?}");
    run.assert_one_error_line();
    assert!(run.stderr.contains("holds a string"), "{run:#?}");
    let v = run.json();
    assert_eq!(v["exists"], false, "{v}");
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .contains("holds a string"),
        "{v}"
    );
    // Nothing was written.
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query(&mut connection(&url))
        .expect("GET");
    assert_eq!(value, "x");
}

#[test]
fn inspect_rejects_bad_input_and_reports_unreachable_redis() {
    let long = "x".repeat(1025);
    let usage: &[&[&str]] = &[
        &["inspect", "", "--redis", "redis://127.0.0.1:1"],
        &["inspect", &long, "--redis", "redis://127.0.0.1:1"],
        &["inspect", "conv"],
        &["inspect", "conv", "--redis", "memory://"],
        &[
            "inspect",
            "conv",
            "--redis",
            "redis://127.0.0.1:1",
            "--key-prefix",
            "a:b",
        ],
        &["inspect"],
    ];
    for args in usage {
        let run = ticketlock(args);
        assert_eq!(run.code, Some(2), "{args:?}: {run:#?}");
        run.assert_one_error_line();
        assert!(run.stdout.is_empty(), "{run:#?}");
    }
    let run = ticketlock(&["inspect", "conv"]);
    assert!(run.stderr.contains("--redis"), "{run:#?}");
    let run = ticketlock(&["inspect", "", "--redis", "redis://127.0.0.1:1"]);
    assert!(run.stderr.contains("conversation id"), "{run:#?}");

    for url in ["redis://user:s3cret@127.0.0.1:1", "http://x"] {
        let run = ticketlock(&["inspect", "conv", "--redis", url]);
        assert_eq!(run.code, Some(3), "{url}: {run:#?}");
        run.assert_one_error_line();
        assert!(!run.stderr.contains("s3cret"), "password shown: {run:#?}");
    }
}

/// Splits `scripts show` output into (header, code) by its header lines.
fn split_scripts(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.starts_with(&format!("-- {LIBRARY_NAME}: ")) {
            out.push((line.trim_end().to_owned(), String::new()));
        } else {
            out.last_mut()
                .expect("output starts with a header line")
                .1
                .push_str(line);
        }
    }
    out
}

#[test]
fn scripts_show_prints_every_script_with_its_sha() {
    let run = ticketlock(&["scripts", "show"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let shown = split_scripts(&run.stdout);
    assert_eq!(shown.len(), lua_scripts().len(), "{}", run.stdout);
    for (script, (header, code)) in lua_scripts().iter().zip(&shown) {
        assert_eq!(
            header,
            &format!("-- {LIBRARY_NAME}: {} sha1 {}", script.name(), script.sha())
        );
        // Byte for byte what the SHA1 is computed over.
        assert_eq!(
            code.trim_end(),
            script.code().trim_end(),
            "{}",
            script.name()
        );
    }
    for name in [
        "issue", "poll", "release", "read", "save", "delete", "update", "extend", "cancel",
        "inspect",
    ] {
        assert!(
            shown
                .iter()
                .any(|(h, _)| h.contains(&format!(" {name} sha1 "))),
            "{name} missing"
        );
    }

    let run = ticketlock(&["scripts", "show", "release"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let shown = split_scripts(&run.stdout);
    assert_eq!(shown.len(), 1);
    let release = lua_scripts()
        .iter()
        .find(|s| s.name() == "release")
        .unwrap();
    assert!(shown[0].0.ends_with(release.sha()));

    let run = ticketlock(&["scripts", "show", "--library"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout.trim_end(), functions_library().trim_end());

    let run = ticketlock(&["scripts", "show", "--json"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let v = run.json();
    let list = v.as_array().expect("an array");
    assert_eq!(list.len(), lua_scripts().len());
    for (script, item) in lua_scripts().iter().zip(list) {
        assert_eq!(item["name"], script.name());
        assert_eq!(item["sha1"], script.sha());
        assert_eq!(item["function"], script.function_name().as_str());
        assert_eq!(item["read_only"], script.is_read_only());
        assert_eq!(item["code"], script.code());
    }

    for bad in [
        &["scripts", "show", "nope"][..],
        &["scripts", "show", "issue", "--library"],
    ] {
        let run = ticketlock(bad);
        assert_eq!(run.code, Some(2), "{bad:?}: {run:#?}");
        run.assert_one_error_line();
    }
}

fn script_exists(conn: &mut redis::Connection) -> Vec<i64> {
    let mut cmd = redis::cmd("SCRIPT");
    cmd.arg("EXISTS");
    for script in lua_scripts() {
        cmd.arg(script.sha());
    }
    cmd.query(conn).expect("SCRIPT EXISTS")
}

/// After `scripts load`, a client that knows nothing but the SHAs (or the
/// function names) takes tickets.
#[test]
fn scripts_load_lets_any_client_call_the_scripts() {
    let server = support::RedisServer::start();
    let url = server.url();
    let mut conn = connection(&url);
    assert!(
        script_exists(&mut conn).iter().all(|&e| e == 0),
        "not fresh"
    );

    let run = ticketlock(&["scripts", "load", "--redis", &url]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.is_empty(), "{run:#?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), lua_scripts().len() + 1, "{run:#?}");
    for (script, line) in lua_scripts().iter().zip(&lines) {
        assert_eq!(*line, format!("{} {}", script.name(), script.sha()));
    }
    assert_eq!(
        lines.last().copied(),
        Some(
            format!(
                "library {LIBRARY_NAME} loaded ({} functions)",
                lua_scripts().len()
            )
            .as_str()
        )
    );

    assert!(script_exists(&mut conn).iter().all(|&e| e == 1));
    let list: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(LIBRARY_NAME)
        .query(&mut conn)
        .expect("FUNCTION LIST");
    assert!(
        matches!(&list, redis::Value::Array(libs) if !libs.is_empty()),
        "{list:?}"
    );

    // By SHA, as redis-cli or Python would.
    let issue = lua_scripts().iter().find(|s| s.name() == "issue").unwrap();
    let keys = |id: &str| [format!("lock:{{{id}}}")];
    let reply: Vec<i64> = redis::cmd("EVALSHA")
        .arg(issue.sha())
        .arg(1)
        .arg(&keys("raw-sha"))
        .arg(60000)
        .arg("")
        .query(&mut conn)
        .expect("EVALSHA issue");
    assert_eq!(reply[0], 0, "ticket 0: {reply:?}");
    assert_eq!(reply[2], 0, "served at once: {reply:?}");
    // By function name.
    let reply: Vec<i64> = redis::cmd("FCALL")
        .arg(format!("{LIBRARY_NAME}_issue"))
        .arg(1)
        .arg(&keys("raw-fcall"))
        .arg(60000)
        .arg("")
        .query(&mut conn)
        .expect("FCALL issue");
    assert_eq!(reply[0], 0, "ticket 0: {reply:?}");

    // Those are ticketlock queues like any other.
    let run = ticketlock(&["inspect", "raw-sha", "--redis", &url, "--json"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let v = run.json();
    assert_eq!(v["exists"], true, "{v}");
    assert_eq!(v["tickets"][0]["kind"], "fixed", "{v}");

    // Loading again is harmless; --json says the same.
    let run = ticketlock(&["scripts", "load", "--redis", &url, "--json"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let v = run.json();
    assert_eq!(v["library"]["loaded"], true, "{v}");
    assert_eq!(u(&v["library"], "functions"), lua_scripts().len() as u64);
    assert_eq!(v["scripts"].as_array().unwrap().len(), lua_scripts().len());
}

/// A server that refuses FUNCTION (here an ACL; Redis 6 the same): the
/// scripts are still loaded, one warning line, exit 0.
#[test]
fn scripts_load_warns_when_functions_are_refused() {
    let server = support::RedisServer::start();
    let mut admin = connection(&server.url());
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("nofunc")
        .arg("on")
        .arg(">s3cret")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-function")
        .query(&mut admin)
        .expect("ACL SETUSER");
    let url = format!("redis://nofunc:s3cret@127.0.0.1:{}", server.port());

    let run = ticketlock(&["scripts", "load", "--redis", &url]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    run.assert_one_error_line();
    assert!(run.stderr.contains("warning"), "{run:#?}");
    assert!(!run.stderr.contains("s3cret"), "password shown: {run:#?}");
    assert_eq!(run.stdout.lines().count(), lua_scripts().len(), "{run:#?}");
    assert!(script_exists(&mut admin).iter().all(|&e| e == 1));

    let run = ticketlock(&["scripts", "load", "--redis", &url, "--json"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.json()["library"]["loaded"], false, "{run:#?}");
}

#[test]
fn scripts_load_needs_a_reachable_redis() {
    let run = ticketlock(&["scripts", "load"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    run.assert_one_error_line();
    let run = ticketlock(&["scripts", "load", "--redis", "redis://127.0.0.1:1"]);
    assert_eq!(run.code, Some(3), "{run:#?}");
    run.assert_one_error_line();
}

/// A setting the library rejects while creating the store is bad input
/// (exit 2), checked before connecting; a malformed URL stays exit 3.
#[test]
fn rejected_settings_exit_2() {
    for value in ["abc", "0", "-1", "NaN"] {
        let run = ticketlock_env(
            &[
                "simulate",
                "--redis",
                "redis://127.0.0.1:1",
                "-c",
                "1",
                "-m",
                "1",
            ],
            &[("TICKET_LOCK_LIFETIME", value)],
        );
        assert_eq!(run.code, Some(2), "{value}: {run:#?}");
        run.assert_one_error_line();
        assert!(run.stderr.contains("TICKET_LOCK_LIFETIME"), "{run:#?}");
    }
    let run = ticketlock(&["simulate", "--redis", "http://x"]);
    assert_eq!(run.code, Some(3), "{run:#?}");
}

const EVENTS: [&str; 4] = [
    "ticket issued",
    "waiting",
    "lock acquired",
    "ticket released",
];

/// `-v` shows the library's tracing events on stderr; without it, nothing.
#[test]
fn verbose_shows_the_library_events() {
    // Three workers on one conversation, each holding 200 ms: two must wait.
    let simulate = ["simulate", "-c", "1", "-m", "3", "-w", "3", "--hold", "200"];
    let run = ticketlock(&[&["-v"][..], &simulate].concat());
    assert_eq!(run.code, Some(0), "{run:#?}");
    for event in EVENTS {
        assert!(
            run.stderr.contains(event),
            "no {event:?} in:\n{}",
            run.stderr
        );
    }
    assert!(run.stderr.contains("DEBUG"), "{}", run.stderr);

    let run = ticketlock(&simulate);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.is_empty(), "{run:#?}");
    for event in EVENTS {
        assert!(
            !run.stdout.contains(event),
            "{event:?} on stdout:\n{}",
            run.stdout
        );
    }

    let url = support::redis_url();
    let run = ticketlock(&["-v", "inspect", "nobody-here", "--redis", &url]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stderr.contains("snapshot read"), "{run:#?}");
    let run = ticketlock(&["inspect", "nobody-here", "--redis", &url]);
    assert!(run.stderr.is_empty(), "{run:#?}");
}

#[test]
fn help_lists_the_operator_commands() {
    let run = ticketlock(&["--help"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    for word in ["simulate", "inspect", "scripts", "Exit codes:"] {
        assert!(run.stdout.contains(word), "{word} in {}", run.stdout);
    }
    for args in [&["inspect", "--help"][..], &["scripts", "load", "--help"]] {
        let run = ticketlock(args);
        assert_eq!(run.code, Some(0), "{run:#?}");
        assert!(run.stdout.contains("--redis"), "{run:#?}");
        assert!(run.stdout.contains("Exit codes:"), "{run:#?}");
    }
}
