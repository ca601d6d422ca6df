//! Python and Rust share one queue: the Python package in `python/` (run as
//! `python -m ticketlock`) sends the very same `lua/` files as the crate, and
//! Rust processes, synchronous Python processes and asyncio Python tasks
//! exclude each other, keep one FIFO order, and wake each other up by pub/sub.
//!
//! Needs a Python with the package installed: `$TICKETLOCK_PYTHON` (which
//! scripts/test.sh sets to its venv's interpreter), else `python3`. Without
//! one these tests fail and say how to get it; they never skip.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use serde_json::Value;
use ticketlock::{LockOptions, LockStore, StoreConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// What every Python child runs: `<python> -m ticketlock <subcommand> ...`.
const MODULE: [&str; 2] = ["-m", "ticketlock"];
/// A hand-over counts as prompt below this (the waiters poll every 30 s).
const PROMPT: Duration = Duration::from_secs(2);
/// No single step of a test may take longer (a loaded 2-core machine included).
const STEP: Duration = Duration::from_secs(60);
/// Critical sections per contender in the contention test.
const SECTIONS: usize = 100;

// --- helpers ---------------------------------------------------------------------

/// The Python interpreter to run, after checking that it can import the
/// package; panics with how to get it.
fn python() -> &'static str {
    static CHECKED: OnceLock<Result<String, String>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        let python = std::env::var("TICKETLOCK_PYTHON")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "python3".to_owned());
        match std::process::Command::new(&python)
            .args(["-c", "import ticketlock, redis"])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => Ok(python),
            Ok(out) => Err(format!(
                "{python} cannot import ticketlock ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("{python} is not runnable ({e})")),
        }
    });
    match checked {
        Ok(python) => python,
        Err(why) => panic!(
            "{why}: the cross-language tests need the Python package — run scripts/test.sh \
             (it sets TICKETLOCK_PYTHON), or `pip install ./python` and set TICKETLOCK_PYTHON"
        ),
    }
}

/// `-m ticketlock <args...>`.
fn module_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    MODULE.iter().copied().chain(args.iter().copied()).collect()
}

fn store_config(url: &str, prefix: &str) -> StoreConfig {
    let mut config = StoreConfig::redis(url);
    config.key_prefix = Some(prefix.to_owned());
    config
}

async fn connection(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connecting to the test Redis")
}

/// lua/common.lua's key of a conversation (also its wake-up channel).
fn meta_key(prefix: &str, conversation_id: &str) -> String {
    let mut id = String::new();
    for c in conversation_id.chars() {
        match c {
            '%' => id.push_str("%25"),
            '{' => id.push_str("%7B"),
            '}' => id.push_str("%7D"),
            c => id.push(c),
        }
    }
    format!("{prefix}:lock:{{{id}}}")
}

async fn keys_with_prefix(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    conn.keys(format!("{prefix}*")).await.expect("KEYS")
}

fn unix_ns() -> i64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    i64::try_from(nanos).expect("nanoseconds fit in i64")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A child process speaking JSON lines on stdout; killed if dropped early.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<String>,
}

impl Proc {
    fn spawn(name: &str, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("TICKETLOCK_LUA_DIR")
            .env_remove("TICKET_LOCK_LIFETIME")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut err = child.stderr.take().expect("stderr");
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text).await;
            text
        });
        Proc {
            name: name.to_owned(),
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    /// The next line on stdout, as JSON.
    async fn line(&mut self) -> Value {
        match tokio::time::timeout(STEP, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line:?}", self.name)),
            Ok(Ok(None)) => {
                let _ = tokio::time::timeout(STEP, self.child.wait()).await;
                let stderr = self.stderr_now().await;
                panic!("{}: stdout ended early; stderr:\n{stderr}", self.name)
            }
            Ok(Err(e)) => panic!("{}: reading stdout: {e}", self.name),
            Err(_) => panic!("{}: no line within {STEP:?}", self.name),
        }
    }

    /// The next line, which must be the event `event`.
    async fn event(&mut self, event: &str) -> Value {
        let line = self.line().await;
        assert_eq!(line["event"], event, "{}: {line}", self.name);
        line
    }

    async fn send_line(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"go\n").await.expect("writing to stdin");
        stdin.flush().await.expect("flushing stdin");
    }

    async fn stderr_now(&mut self) -> String {
        let _ = self.child.start_kill();
        match tokio::time::timeout(Duration::from_secs(5), &mut self.stderr).await {
            Ok(Ok(text)) => text,
            _ => "<unreadable>".into(),
        }
    }

    /// Waits for a successful exit; returns the last line it printed.
    async fn finish(mut self) -> Value {
        self.stdin = None;
        let last = self.line().await;
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {STEP:?}", self.name))
            .expect("waiting for the child");
        let stderr = tokio::time::timeout(STEP, self.stderr)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        assert!(
            status.success(),
            "{} failed ({status}); stderr:\n{stderr}",
            self.name
        );
        last
    }
}

// --- (a) one queue, two languages ------------------------------------------------

/// One entry of the grant log: "<ticket> <lang> <pid> <epoch> <fence>".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    ticket: u64,
    lang: String,
    pid: u32,
    epoch: u64,
    fence: u64,
}

fn parse_grant(entry: &str) -> Grant {
    let f: Vec<&str> = entry.split(' ').collect();
    let number = |i: usize| -> u64 {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("malformed grant log entry {entry:?}"))
    };
    assert_eq!(f.len(), 5, "malformed grant log entry {entry:?}");
    Grant {
        ticket: number(0),
        lang: f[1].to_owned(),
        pid: u32::try_from(number(2)).expect("pid"),
        epoch: number(3),
        fence: number(4),
    }
}

/// What a contender in this test process does: the same critical section as
/// the `contend` example and `python -m ticketlock contend`.
async fn contend_here(
    store: LockStore,
    mut conn: MultiplexedConnection,
    cid: String,
    meta: String,
    counter: String,
    log: String,
) {
    let pid = std::process::id();
    let options = LockOptions::default()
        .with_lifetime(Duration::from_secs(30))
        .with_dead_waiter_timeout(Duration::from_secs(30));
    for _ in 0..SECTIONS {
        let guard = store.lock_with(&cid, options).await.expect("lock");
        // lua/common.lua: the record's epoch is the hash field `e`.
        let epoch: u64 = conn.hget(&meta, "e").await.expect("HGET e");
        let value: Option<u64> = conn.get(&counter).await.expect("GET");
        let () = conn
            .set(&counter, value.unwrap_or(0) + 1)
            .await
            .expect("SET");
        let entry = format!(
            "{} rs {pid} {epoch} {}",
            guard.ticket(),
            guard.fencing_token()
        );
        let _: u64 = conn.rpush(&log, entry).await.expect("RPUSH");
        guard.release().await.expect("release");
    }
}

/// Two synchronous Python processes, a Python process of 3 asyncio tasks, a
/// Rust process and two tasks of this process take the same conversation's
/// lock 100 times each, doing a non-atomic increment inside: no update is
/// lost, the grants follow ticket order across both languages, and nothing is
/// left in Redis afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_rust_processes_share_one_fifo_queue() {
    let python = python();
    let binary = tokio::task::spawn_blocking(|| support::example_binary("contend"))
        .await
        .expect("building the contend example");
    let url = support::redis_url();
    let prefix = support::unique_prefix("xl");
    // Braces, a percent sign, a space and non-ASCII: both sides must derive
    // the same keys from it, or they would not exclude each other.
    let cid = "xl {shared} 100% é".to_owned();
    let meta = meta_key(&prefix, &cid);
    let counter = format!("{prefix}:data:counter");
    let log = format!("{prefix}:data:log");
    let mut conn = connection(&url).await;

    let count = SECTIONS.to_string();
    let common = [
        "--redis",
        url.as_str(),
        "--prefix",
        prefix.as_str(),
        "--conversation",
        cid.as_str(),
        "--count",
        count.as_str(),
        "--counter-key",
        counter.as_str(),
        "--log-key",
        log.as_str(),
        // Generous: a contender starved for seconds on a loaded machine
        // must not lose its place (or its lease).
        "--lifetime-s",
        "30",
        "--dead-waiter-timeout-s",
        "30",
        "--ready-go",
    ];
    let with = |first: &[&'static str]| -> Vec<&str> {
        first
            .iter()
            .copied()
            .chain(common.iter().copied())
            .collect()
    };
    let asyncio: Vec<&str> =
        module_args(&["contend", "--asyncio", "--tasks", "3", "--stores", "2"])
            .into_iter()
            .chain(common.iter().copied())
            .collect();
    let mut children = vec![
        Proc::spawn(
            "python contender 1",
            python,
            &with(&["-m", "ticketlock", "contend"]),
        ),
        Proc::spawn(
            "python contender 2",
            python,
            &with(&["-m", "ticketlock", "contend"]),
        ),
        Proc::spawn("python asyncio contender", python, &asyncio),
        Proc::spawn("rust contender", &binary, &with(&[])),
    ];
    let mut pids = BTreeMap::new();
    for child in &mut children {
        let ready = child.event("ready").await;
        let pid = u32::try_from(ready["pid"].as_u64().expect("pid")).expect("pid");
        pids.insert(pid, ready["lang"].as_str().expect("lang").to_owned());
    }
    let mut here = Vec::new();
    for _ in 0..2 {
        let store = LockStore::create(Some(&store_config(&url, &prefix)))
            .await
            .expect("store");
        here.push((store, connection(&url).await));
    }

    // Everyone starts at once.
    let started = Instant::now();
    for child in &mut children {
        child.send_line().await;
    }
    let tasks: Vec<_> = here
        .into_iter()
        .map(|(store, conn)| {
            tokio::spawn(contend_here(
                store,
                conn,
                cid.clone(),
                meta.clone(),
                counter.clone(),
                log.clone(),
            ))
        })
        .collect();
    let mut summaries = Vec::new();
    for child in children {
        summaries.push(child.finish().await);
    }
    for task in tasks {
        tokio::time::timeout(STEP, task)
            .await
            .expect("the in-process contenders finish")
            .expect("an in-process contender failed");
    }
    let took = started.elapsed();

    // 2 sync Python + 3 asyncio tasks + 1 Rust process + 2 tasks here.
    let total = 8 * SECTIONS;
    for summary in &summaries {
        let tasks = summary["tasks"].as_u64().unwrap_or(1) as usize;
        assert_eq!(summary["count"], tasks * SECTIONS, "{summary}");
    }
    let value: Option<u64> = conn.get(&counter).await.expect("GET");
    assert_eq!(
        value,
        Some(total as u64),
        "updates were lost: two holders overlapped"
    );
    let entries: Vec<String> = conn.lrange(&log, 0, -1).await.expect("LRANGE");
    assert_eq!(entries.len(), total);
    let grants: Vec<Grant> = entries.iter().map(|e| parse_grant(e)).collect();

    // Grant order is ticket order (numbers restart only with a new record,
    // when the queue ran empty), and every grant has a greater fencing token.
    for pair in grants.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            (a.epoch, a.ticket) < (b.epoch, b.ticket),
            "granted out of ticket order: {a:?} then {b:?}"
        );
        assert!(
            a.fence < b.fence,
            "fencing tokens not increasing: {a:?} then {b:?}"
        );
    }
    // Every contender's sections are all there, under its own language.
    let mut per_pid: BTreeMap<u32, (String, usize)> = BTreeMap::new();
    for g in &grants {
        let slot = per_pid.entry(g.pid).or_insert_with(|| (g.lang.clone(), 0));
        assert_eq!(slot.0, g.lang, "pid {} logged as two languages", g.pid);
        slot.1 += 1;
    }
    pids.insert(std::process::id(), "rs".into());
    for (pid, lang) in &pids {
        let expected = match lang.as_str() {
            _ if *pid == std::process::id() => 2 * SECTIONS,
            "pya" => 3 * SECTIONS,
            _ => SECTIONS,
        };
        assert_eq!(
            per_pid.get(pid),
            Some(&(lang.clone(), expected)),
            "pid {pid} ({lang})"
        );
    }
    assert_eq!(per_pid.len(), pids.len(), "unknown pids in the log");
    // Both languages took turns within one record: one queue, not two.
    let is_python = |lang: &str| lang.starts_with("py");
    let handoffs = grants
        .windows(2)
        .filter(|p| p[0].epoch == p[1].epoch && is_python(&p[0].lang) != is_python(&p[1].lang))
        .count();
    let languages: BTreeSet<&str> = grants.iter().map(|g| g.lang.as_str()).collect();
    assert_eq!(
        languages,
        BTreeSet::from(["py", "pya", "rs"]),
        "every kind of contender was granted the lock"
    );
    let records: BTreeSet<u64> = grants.iter().map(|g| g.epoch).collect();
    assert!(
        handoffs > 0,
        "the languages never handed the lock to each other within one record"
    );
    println!(
        "cross-language contention: {total} sections in {:.0} ms ({:.2} ms each), \
         {handoffs} python<->rust hand-offs, {} record(s); summaries: {summaries:?}",
        ms(took),
        ms(took) / total as f64,
        records.len()
    );

    let _: () = conn.del(&[&counter, &log]).await.expect("DEL");
    assert_eq!(
        keys_with_prefix(&mut conn, &prefix).await,
        Vec::<String>::new()
    );
}

// --- (b) wake-ups across languages -----------------------------------------------

/// Options of a waiter that only a wake-up can serve promptly: it checks the
/// queue every 30 s at most (wait time and check-ins alike).
fn patient() -> LockOptions {
    LockOptions::default()
        .with_lifetime(Duration::from_secs(30))
        .with_wait_time(Duration::from_secs(30))
        .with_dead_waiter_timeout(Duration::from_secs(90))
        .with_timeout(Duration::from_secs(45))
}

const PATIENT_PY: [&str; 8] = [
    "--lifetime-s",
    "30",
    "--wait-time-s",
    "30",
    "--dead-waiter-timeout-s",
    "90",
    "--timeout-s",
    "45",
];

async fn wait_for_subscriber(conn: &mut MultiplexedConnection, channel: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(conn)
            .await
            .expect("PUBSUB NUMSUB");
        if counts.first().is_some_and(|(_, n)| *n > 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nobody subscribed to {channel} within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A Rust waiter is woken by a Python release, and a Python waiter by a Rust
/// release, well before either would poll again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_wake_waiters_of_the_other_language() {
    let python = python();
    let url = support::redis_url();
    let prefix = support::unique_prefix("xlw");
    let mut conn = connection(&url).await;
    let store = LockStore::create(Some(&store_config(&url, &prefix)))
        .await
        .expect("store");
    let (mut to_rust, mut to_python) = (Vec::new(), Vec::new());

    for round in 0..3 {
        // Python holds, Rust waits.
        let cid = format!("py to rs {round}");
        let mut args = module_args(&["lock", "--redis", &url, "--prefix", &prefix]);
        args.extend(["--conversation", &cid, "--lifetime-s", "30"]);
        args.push("--hold-until-stdin");
        let mut holder = Proc::spawn("python holder", python, &args);
        assert_eq!(holder.event("acquired").await["ticket"], 0);
        let waiter = tokio::spawn({
            let (store, cid) = (store.clone(), cid.clone());
            async move {
                let guard = store.lock_with(&cid, patient()).await.expect("rust waiter");
                (guard, Instant::now(), unix_ns())
            }
        });
        // Once subscribed, the waiter asks where it stands at once; give it
        // time to do so and go to sleep.
        wait_for_subscriber(&mut conn, &meta_key(&prefix, &cid)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let told = Instant::now();
        holder.send_line().await;
        let (guard, served_at, served_unix) = tokio::time::timeout(STEP, waiter)
            .await
            .expect("the rust waiter is served")
            .expect("the rust waiter task");
        let released = holder.finish().await;
        assert_eq!(released["event"], "released", "{released}");
        assert_eq!(guard.ticket(), 1);
        let took = served_at - told;
        let wall = served_unix - released["release_start_unix_ns"].as_i64().expect("ns");
        assert!(took < PROMPT, "python -> rust hand-off took {took:?}");
        guard.release().await.expect("release");
        to_rust.push((took, wall));

        // Rust holds, Python waits.
        let cid = format!("rs to py {round}");
        let guard = store
            .lock_with(
                &cid,
                LockOptions::default().with_lifetime(Duration::from_secs(30)),
            )
            .await
            .expect("rust holder");
        let mut args = module_args(&["lock", "--redis", &url, "--prefix", &prefix]);
        args.extend(["--conversation", &cid]);
        args.extend(PATIENT_PY);
        let mut waiter = Proc::spawn("python waiter", python, &args);
        let waiting = waiter.event("waiting").await;
        assert_eq!(
            (&waiting["ticket"], &waiting["ahead"]),
            (&1.into(), &1.into())
        );
        // "waiting" comes after its subscription and its first check: from
        // here on only a wake-up can serve it within 30 s.
        let told = Instant::now();
        let release_unix = unix_ns();
        guard.release().await.expect("rust release");
        let acquired = waiter.event("acquired").await;
        let took = told.elapsed();
        let wall = acquired["unix_ns"].as_i64().expect("ns") - release_unix;
        assert_eq!(acquired["ticket"], 1);
        assert!(took < PROMPT, "rust -> python hand-off took {took:?}");
        assert_eq!(waiter.finish().await["event"], "released");
        to_python.push((took, wall));
    }

    let show = |v: &[(Duration, i64)]| -> String {
        v.iter()
            .map(|(took, wall)| {
                format!("{:.1} ms (clock: {:.1} ms)", ms(*took), *wall as f64 / 1e6)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("python -> rust hand-offs: {}", show(&to_rust));
    println!("rust -> python hand-offs: {}", show(&to_python));
    assert_eq!(
        keys_with_prefix(&mut conn, &prefix).await,
        Vec::<String>::new()
    );
}

// --- (d) the same scripts, the same keys -------------------------------------------

/// The Python package sends byte-identical scripts (same SHA1s) and derives
/// the same key name as the crate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_package_sends_the_crates_scripts_and_keys() {
    let python = python();
    let url = support::redis_url();

    let scripts = Proc::spawn("python scripts", python, &module_args(&["scripts"]));
    let shas = scripts.finish().await;
    let python_shas: BTreeMap<String, String> =
        serde_json::from_value(shas["scripts"].clone()).expect("{name: sha}");
    let crate_shas: BTreeMap<String, String> = ticketlock::lua_scripts()
        .iter()
        .map(|s| (s.name().to_owned(), s.sha().to_owned()))
        .collect();
    assert_eq!(
        python_shas, crate_shas,
        "the Python package does not send what the crate sends (OPERATIONS out of date?)"
    );
    assert_eq!(shas["library"], ticketlock::LIBRARY_NAME);

    // Keys: what Rust creates is what Python names.
    let prefix = support::unique_prefix("xlk");
    let cid = "}odd{ 50% id";
    let store = LockStore::create(Some(&store_config(&url, &prefix)))
        .await
        .expect("store");
    let ticket = store
        .issue_ticket(cid, Duration::from_secs(30))
        .await
        .expect("issue");
    let mut conn = connection(&url).await;
    let created = keys_with_prefix(&mut conn, &prefix).await;
    let args = module_args(&["keys", "--prefix", &prefix, "--conversation", cid]);
    let named = Proc::spawn("python keys", python, &args).finish().await;
    let named: String = serde_json::from_value(named["key"].clone()).expect("key");
    assert_eq!(created, vec![named.clone()]);
    assert_eq!(named, meta_key(&prefix, cid));
    store.cleanup(cid, ticket).await.expect("cleanup");
    assert_eq!(
        keys_with_prefix(&mut conn, &prefix).await,
        Vec::<String>::new()
    );
}
