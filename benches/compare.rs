//! The comparison benchmark behind `scripts/bench.sh`: one table in which
//! every figure stands beside a baseline measured in the same run, as a ratio.
//!
//! Run with `cargo bench --bench compare` (release profile). It starts its own
//! `redis-server` on a free loopback port (tests/support), measures, prints the
//! table (markdown) on stdout, writes it to `$BENCH_REPORT` (default
//! `target/bench/compare.md`), and exits non-zero only when an invariant broke
//! during the runs: two holders of one lock at once, grants out of ticket
//! order, lock errors, or keys left behind. Timings are never asserted: a
//! target that is missed shows as `no` in the table.
//!
//! Rows are numbered by the item of issue 8 they answer: 1 server time per
//! uncontended cycle (absolute, and against a minimal reference pair of
//! scripts), 2 `redis.call`s per cycle, 3 throughput against rslock and the
//! RTT floor, 4 hot hand-off, 5 the in-memory store against tokio mutexes,
//! 6 properties that must not change (deep queues, memory, fairness).
//!
//! Environment: `TICKETLOCK_BIN` (the CLI for the 2-process row; default
//! `target/release/ticketlock`), `BENCH_REPORT` (markdown output path).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::task::JoinSet;

use ticketlock::{LockOptions, LockStore, ScriptMode, StoreConfig};

/// TTL of every rslock lock (it never runs out during a cycle).
const RSLOCK_TTL: Duration = Duration::from_secs(10);
/// Lifetime of the deep-queue tickets (they must outlive the whole run).
const DEEP_LIFETIME: Duration = Duration::from_secs(3600);
/// Queue depths of rows 4 and 5.
const DEPTHS: [usize; 3] = [1, 100, 10_000];
/// Messages of the 2-process CLI run (one conversation).
const CLI_MESSAGES: u32 = 6000;
/// Row 1's budget: server time per uncontended lock + release.
const SERVER_BUDGET_US: f64 = 12.0;
/// Row 6's budget: Redis memory of a conversation holding one ticket.
const ONE_TICKET_BUDGET_BYTES: f64 = 200.0;

/// Row 1's reference issue: the least an issue into an empty conversation
/// needs. One read of the hash (refusing a record that is there), the clock,
/// one HSET of the fields a grant needs (next number, epoch, served, fence,
/// the ticket's expiry), the key's expiry. ARGV[1] lifetime ms.
const REFERENCE_ISSUE: &str = r"
local v = redis.call('HMGET', KEYS[1], 'n', 'h', 's', 'f')
if v[1] then return redis.error_reply('ERR reference: conversation not empty') end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local at = math.floor(now_us / 1000) + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'n', 1, 'e', now_us, 's', 0, 'f', now_us, 't0', at)
redis.call('PEXPIREAT', KEYS[1], at + 1000)
return { 0, now_us, 0, tonumber(ARGV[1]), now_us }
";

/// Row 1's reference release of the sole ticket: read the head, delete.
/// ARGV[1] the ticket.
const REFERENCE_RELEASE: &str = r"
local v = redis.call('HMGET', KEYS[1], 'n', 'h', 't' .. ARGV[1])
if not v[3] then return { 0, -1 } end
redis.call('DEL', KEYS[1])
return { 1, -1 }
";

// ---------------------------------------------------------------------------
// The table

#[derive(Clone, Copy)]
enum Target {
    None,
    AtLeast(f64),
    AtMost(f64),
    Between(f64, f64),
}

impl Target {
    fn show(self) -> String {
        match self {
            Target::None => "—".into(),
            Target::AtLeast(x) => format!("≥ {x}"),
            Target::AtMost(x) => format!("≤ {x}"),
            Target::Between(lo, hi) => format!("{lo}–{hi}"),
        }
    }

    fn met(self, ratio: Option<f64>) -> &'static str {
        let Some(r) = ratio else {
            return "—";
        };
        let ok = match self {
            Target::None => return "—",
            Target::AtLeast(x) => r >= x,
            Target::AtMost(x) => r <= x,
            Target::Between(lo, hi) => (lo..=hi).contains(&r),
        };
        if ok {
            "yes"
        } else {
            "**no**"
        }
    }
}

struct Row {
    case: String,
    figure: String,
    baseline: String,
    ratio: Option<f64>,
    target: Target,
}

/// The item a row answers: its leading number; the floor row first, rows
/// without a number (the invariants) last.
fn section(case: &str) -> u8 {
    match case.split_whitespace().next().map(str::parse::<u8>) {
        Some(Ok(n)) => n,
        _ if case.starts_with("floor") => 0,
        _ => u8::MAX,
    }
}

/// The table, rows in item order (stable: within an item, as measured).
fn render(rows: &[Row]) -> String {
    let mut rows: Vec<&Row> = rows.iter().collect();
    rows.sort_by_key(|r| section(&r.case));
    let header = [
        "case",
        "figure",
        "baseline (same run)",
        "ratio",
        "target",
        "met?",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.case.clone(),
                r.figure.clone(),
                r.baseline.clone(),
                r.ratio.map_or("—".into(), |x| format!("{x:.2}")),
                r.target.show(),
                r.target.met(r.ratio).into(),
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let padded: Vec<String> = cols
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(&header.map(String::from));
    out += &line(&width.map(|w| "-".repeat(w)));
    for row in &cells {
        out += &line(row);
    }
    out
}

// ---------------------------------------------------------------------------
// Formatting and statistics

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn per_s(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.0}k/s", x / 1000.0)
    } else {
        format!("{x:.0}/s")
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i]
}

fn stage(name: &str) {
    eprintln!("compare: {name}");
}

// ---------------------------------------------------------------------------
// Lockers: ours, the peer, and the in-memory baseline, behind one interface

#[derive(Clone)]
enum Locker {
    Ticket(LockStore, LockOptions),
    Redlock(rslock::LockManager),
    MutexMap(Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>),
}

enum Held {
    Ticket(ticketlock::LockGuard),
    Redlock(rslock::Lock),
    Mutex(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>),
}

impl Locker {
    fn mutex_map() -> Self {
        Locker::MutexMap(Arc::default())
    }

    async fn acquire(&self, key: &str) -> Result<Held, String> {
        match self {
            Locker::Ticket(store, options) => store
                .lock_with(key, *options)
                .await
                .map(Held::Ticket)
                .map_err(|e| e.to_string()),
            Locker::Redlock(manager) => manager
                .acquire_no_guard(key, RSLOCK_TTL)
                .await
                .map(Held::Redlock)
                .map_err(|e| e.to_string()),
            Locker::MutexMap(map) => {
                let mutex = {
                    let mut map = map.lock().expect("baseline map poisoned");
                    match map.get(key) {
                        Some(m) => Arc::clone(m),
                        None => {
                            let m = Arc::new(tokio::sync::Mutex::new(()));
                            map.insert(key.to_owned(), Arc::clone(&m));
                            m
                        }
                    }
                };
                Ok(Held::Mutex(mutex.lock_owned().await))
            }
        }
    }
}

impl Held {
    fn ticket(&self) -> Option<u64> {
        match self {
            Held::Ticket(g) => Some(g.ticket()),
            _ => None,
        }
    }

    async fn release(self) -> Result<(), String> {
        match self {
            Held::Ticket(g) => g.release().await.map_err(|e| e.to_string()),
            Held::Redlock(lock) => {
                lock.release().await;
                Ok(())
            }
            Held::Mutex(_guard) => Ok(()),
        }
    }
}

/// Invariant counters shared by the tasks of one run.
#[derive(Default)]
struct Watch {
    overlaps: AtomicU64,
    order_violations: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Watch {
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().expect("poisoned").get_or_insert(e);
    }

    /// Adds this run's broken invariants to `failures`.
    fn report(&self, run: &str, failures: &mut Vec<String>) {
        let overlaps = self.overlaps.load(Ordering::Relaxed);
        let order = self.order_violations.load(Ordering::Relaxed);
        let errors = self.errors.load(Ordering::Relaxed);
        if overlaps > 0 {
            failures.push(format!("{run}: {overlaps} overlapping critical sections"));
        }
        if order > 0 {
            failures.push(format!("{run}: {order} grants out of ticket order"));
        }
        if errors > 0 {
            let first = self.first_error.lock().expect("poisoned").clone();
            failures.push(format!(
                "{run}: {errors} lock errors, first: {}",
                first.unwrap_or_default()
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// Runs

/// `keys.len()` tasks, each looping acquire + release on its own key for
/// `span`, with per-key holder counting and ticket-order checking.
/// Returns completed cycles per second.
async fn cycles(locker: &Locker, keys: &[String], span: Duration, watch: &Arc<Watch>) -> f64 {
    let (done, secs) = cycle_run(locker, keys, span, watch).await;
    done as f64 / secs
}

/// [`cycles`], as (completed cycles, seconds).
async fn cycle_run(
    locker: &Locker,
    keys: &[String],
    span: Duration,
    watch: &Arc<Watch>,
) -> (u64, f64) {
    let started = Instant::now();
    let deadline = started + span;
    let mut tasks = JoinSet::new();
    for key in keys {
        let (locker, key, watch) = (locker.clone(), key.clone(), Arc::clone(watch));
        tasks.spawn(async move {
            let holders = AtomicI64::new(0);
            let mut last: Option<u64> = None;
            let mut done = 0u64;
            while Instant::now() < deadline {
                let held = match locker.acquire(&key).await {
                    Ok(h) => h,
                    Err(e) => {
                        watch.error(e);
                        break;
                    }
                };
                if holders.fetch_add(1, Ordering::SeqCst) != 0 {
                    watch.overlaps.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(t) = held.ticket() {
                    // Grants increase; 0 starts a new record (its queue emptied).
                    if last.is_some_and(|l| t <= l) && t != 0 {
                        watch.order_violations.fetch_add(1, Ordering::Relaxed);
                    }
                    last = Some(t);
                }
                holders.fetch_sub(1, Ordering::SeqCst);
                if let Err(e) = held.release().await {
                    watch.error(e);
                    break;
                }
                done += 1;
            }
            done
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.expect("bench task panicked");
    }
    (total, started.elapsed().as_secs_f64())
}

/// One critical section of a contended run.
#[derive(Clone, Copy)]
struct Section {
    task: usize,
    ticket: Option<u64>,
    asked: Instant,
    entered: Instant,
    leaving: Instant,
}

/// Results of a contended run on one key.
struct Contended {
    /// Grants to a task that was already waiting when the previous holder
    /// began to release, per second of the run.
    handoffs_per_s: f64,
    /// From the previous holder's `release` call to the next holder inside.
    handoff: Vec<Duration>,
    /// From asking for the lock to being inside, every grant.
    waits: Vec<Duration>,
    /// Grants per second of the run.
    grants_per_s: f64,
    /// Critical sections per task.
    per_task: Vec<u64>,
    /// Times ticket numbering restarted at 0 (the queue had emptied).
    epochs: u64,
}

impl Contended {
    fn p(&self, q: f64) -> Duration {
        percentile(&self.handoff, q)
    }

    fn spread(&self) -> (u64, u64) {
        let min = self.per_task.iter().copied().min().unwrap_or(0);
        let max = self.per_task.iter().copied().max().unwrap_or(0);
        (min, max)
    }

    fn wait_text(&self) -> String {
        format!(
            "p50 {} p99 {} max {}",
            ms(percentile(&self.waits, 50.0)),
            ms(percentile(&self.waits, 99.0)),
            ms(self.waits.last().copied().unwrap_or_default())
        )
    }

    fn latency_text(&self) -> String {
        if self.handoff.is_empty() {
            "no hand-off".into()
        } else {
            format!("p50 {} p99 {}", us(self.p(50.0)), us(self.p(99.0)))
        }
    }
}

/// `tasks_per_locker` tasks per locker, all on `key`, for `span`. A task
/// still waiting at the end gives up (its pending acquire is dropped).
async fn contend(
    lockers: &[Locker],
    tasks_per_locker: usize,
    key: &str,
    span: Duration,
    watch: &Arc<Watch>,
) -> Contended {
    let started = Instant::now();
    let deadline = started + span;
    let holders = Arc::new(AtomicI64::new(0));
    let mut tasks = JoinSet::new();
    let mut task = 0;
    for locker in lockers {
        for _ in 0..tasks_per_locker {
            let (locker, key, watch, holders) = (
                locker.clone(),
                key.to_owned(),
                Arc::clone(watch),
                Arc::clone(&holders),
            );
            let me = task;
            task += 1;
            tasks.spawn(async move {
                let mut sections = Vec::new();
                loop {
                    let asked = Instant::now();
                    if asked >= deadline {
                        break;
                    }
                    let wait = deadline - asked;
                    let held = match tokio::time::timeout(wait, locker.acquire(&key)).await {
                        Err(_) => break,
                        Ok(Err(e)) => {
                            watch.error(e);
                            break;
                        }
                        Ok(Ok(h)) => h,
                    };
                    let entered = Instant::now();
                    if holders.fetch_add(1, Ordering::SeqCst) != 0 {
                        watch.overlaps.fetch_add(1, Ordering::Relaxed);
                    }
                    let ticket = held.ticket();
                    holders.fetch_sub(1, Ordering::SeqCst);
                    let leaving = Instant::now();
                    if let Err(e) = held.release().await {
                        watch.error(e);
                        break;
                    }
                    if entered < deadline {
                        sections.push(Section {
                            task: me,
                            ticket,
                            asked,
                            entered,
                            leaving,
                        });
                    }
                }
                sections
            });
        }
    }
    let mut all: Vec<Section> = Vec::new();
    while let Some(s) = tasks.join_next().await {
        all.extend(s.expect("bench task panicked"));
    }
    // Exclusion held (checked above), so entry order is grant order.
    all.sort_by_key(|s| s.entered);
    let mut per_task = vec![0u64; task];
    let mut handoff = Vec::new();
    let mut waits = Vec::with_capacity(all.len());
    let mut epochs = 0;
    for (i, s) in all.iter().enumerate() {
        per_task[s.task] += 1;
        waits.push(s.entered.saturating_duration_since(s.asked));
        let Some(prev) = i.checked_sub(1).map(|j| all[j]) else {
            continue;
        };
        if s.entered < prev.leaving {
            watch.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(a), Some(b)) = (prev.ticket, s.ticket) {
            if b == 0 {
                epochs += 1;
            } else if b <= a {
                watch.order_violations.fetch_add(1, Ordering::Relaxed);
            }
        }
        if s.asked < prev.leaving {
            handoff.push(s.entered.saturating_duration_since(prev.leaving));
        }
    }
    handoff.sort();
    waits.sort();
    Contended {
        handoffs_per_s: handoff.len() as f64 / span.as_secs_f64(),
        handoff,
        grants_per_s: all.len() as f64 / span.as_secs_f64(),
        waits,
        per_task,
        epochs,
    }
}

/// Sequential EVALSHA of `return 1` for `span`: per-call latencies. Runs in
/// a spawned task, like every measured loop: on the runtime's workers rather
/// than in `block_on`, whose thread would add a cross-thread wake-up per reply.
async fn floor(conn: &ConnectionManager, sha: &str, span: Duration) -> Vec<Duration> {
    let (mut conn, sha) = (conn.clone(), sha.to_owned());
    tokio::spawn(async move { floor_loop(&mut conn, &sha, span).await })
        .await
        .expect("floor task panicked")
}

async fn floor_loop(conn: &mut ConnectionManager, sha: &str, span: Duration) -> Vec<Duration> {
    let deadline = Instant::now() + span;
    let mut samples = Vec::with_capacity(100_000);
    loop {
        let t = Instant::now();
        if t >= deadline {
            break;
        }
        let one: i64 = redis::cmd("EVALSHA")
            .arg(sha)
            .arg(0)
            .query_async(conn)
            .await
            .expect("EVALSHA return 1");
        assert_eq!(one, 1);
        samples.push(t.elapsed());
    }
    samples
}

/// Sequential reference issue + release on one key for `span`, in a
/// spawned task (as `floor`): completed cycles.
async fn reference_cycles(
    conn: &ConnectionManager,
    shas: &(String, String),
    span: Duration,
) -> u64 {
    let (mut conn, shas) = (conn.clone(), shas.clone());
    tokio::spawn(async move {
        let key = "ref:{solo}";
        let deadline = Instant::now() + span;
        let mut done = 0;
        while Instant::now() < deadline {
            let issued: Vec<i64> = redis::cmd("EVALSHA")
                .arg(&shas.0)
                .arg(1)
                .arg(key)
                .arg(60_000)
                .query_async(&mut conn)
                .await
                .expect("reference issue");
            assert_eq!(issued[0], 0, "reference issue found a record");
            let released: Vec<i64> = redis::cmd("EVALSHA")
                .arg(&shas.1)
                .arg(1)
                .arg(key)
                .arg(0)
                .query_async(&mut conn)
                .await
                .expect("reference release");
            assert_eq!(released[0], 1, "reference release found no ticket");
            done += 1;
        }
        done
    })
    .await
    .expect("reference task panicked")
}

// ---------------------------------------------------------------------------
// Redis helpers

async fn keys(conn: &mut ConnectionManager, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .expect("KEYS")
}

/// `lock:*` keys, waiting up to 2 s for background give-backs to land.
async fn leftover_lock_keys(conn: &mut ConnectionManager) -> Vec<String> {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let left = keys(conn, "lock:*").await;
        if left.is_empty() || Instant::now() >= until {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn memory_usage(conn: &mut ConnectionManager, key: &str) -> i64 {
    let bytes: Option<i64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(conn)
        .await
        .expect("MEMORY USAGE");
    bytes.unwrap_or(0)
}

/// Seconds of CPU the server has used (`used_cpu_sys` + `used_cpu_user`).
async fn server_cpu(conn: &mut ConnectionManager) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .expect("INFO cpu");
    info.lines()
        .filter_map(|l| {
            let v = l
                .strip_prefix("used_cpu_sys:")
                .or_else(|| l.strip_prefix("used_cpu_user:"))?;
            v.trim().parse::<f64>().ok()
        })
        .sum()
}

/// The commands that run a script: their `usec` includes every `redis.call`
/// the script makes (each of which is also counted under its own name).
const SCRIPT_COMMANDS: [&str; 4] = ["fcall", "fcall_ro", "evalsha", "evalsha_ro"];

/// What the server did since the last `CONFIG RESETSTAT` (`INFO commandstats`).
#[derive(Default, Clone, Copy)]
struct ServerWork {
    /// Microseconds spent in script commands (their `redis.call`s included).
    script_usec: f64,
    /// Script commands run.
    script_calls: f64,
    /// Other commands, less the bench's and the client library's own
    /// (`INFO`, `CONFIG`, `PING`, `HELLO`, `CLIENT`, `SCRIPT`, `FUNCTION`,
    /// (un)subscribing): with nothing else sent, the scripts' `redis.call`s.
    inner_calls: f64,
    /// `SUBSCRIBE` and `SSUBSCRIBE` commands (a round trip each).
    subscribes: f64,
}

impl ServerWork {
    fn add(&mut self, other: ServerWork) {
        self.script_usec += other.script_usec;
        self.script_calls += other.script_calls;
        self.inner_calls += other.inner_calls;
        self.subscribes += other.subscribes;
    }
}

async fn server_work(conn: &mut ConnectionManager) -> ServerWork {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    let mut work = ServerWork::default();
    for line in info.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let (mut calls, mut usec) = (0.0, 0.0);
        for kv in stats.split(',') {
            match kv.split_once('=') {
                Some(("calls", v)) => calls = v.trim().parse::<f64>().unwrap_or(0.0),
                Some(("usec", v)) => usec = v.trim().parse::<f64>().unwrap_or(0.0),
                _ => {}
            }
        }
        let own = ["info", "config|resetstat", "ping", "hello"];
        let own_prefixes = [
            "client|",
            "script|",
            "function|",
            "subscribe",
            "unsubscribe",
            "ssubscribe",
            "sunsubscribe",
        ];
        if name == "subscribe" || name == "ssubscribe" {
            work.subscribes += calls;
        }
        if SCRIPT_COMMANDS.contains(&name) {
            work.script_usec += usec;
            work.script_calls += calls;
        } else if !own.contains(&name) && !own_prefixes.iter().any(|p| name.starts_with(p)) {
            work.inner_calls += calls;
        }
    }
    work
}

async fn reset_stats(conn: &mut ConnectionManager) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .expect("CONFIG RESETSTAT");
}

/// A conversation's one key (contract v2: one hash per conversation).
fn conversation_key(cid: &str) -> String {
    format!("lock:{{{cid}}}")
}

/// The server's pipelined EVALSHA ceiling, from redis-benchmark.
fn evalsha_ceiling(port: u16, sha: &str) -> Result<f64, String> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", "50", "-P", "16", "-n", "500000", "-q"])
        .args(["evalsha", sha, "0"])
        .output()
        .map_err(|e| format!("running redis-benchmark: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(['\r', '\n'])
        .filter_map(|line| {
            let (head, _) = line.split_once(" requests per second")?;
            head.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .next_back()
        .ok_or_else(|| {
            format!(
                "could not read redis-benchmark's output ({}): {text} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Issues `n` tickets on `cid`, 256 at a time; returns their numbers.
async fn fill(store: &LockStore, cid: &str, n: usize) -> Result<Vec<u64>, String> {
    let mut numbers = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let mut set = JoinSet::new();
        for _ in 0..left.min(256) {
            let (store, cid) = (store.clone(), cid.to_owned());
            set.spawn(async move { store.issue_ticket(&cid, DEEP_LIFETIME).await });
        }
        left -= left.min(256);
        while let Some(r) = set.join_next().await {
            numbers.push(
                r.expect("fill task")
                    .map_err(|e| format!("issue_ticket: {e}"))?,
            );
        }
    }
    Ok(numbers)
}

/// Cleans up every ticket in `numbers`, 256 at a time.
async fn clean(store: &LockStore, cid: &str, numbers: &[u64]) -> Result<(), String> {
    for chunk in numbers.chunks(256) {
        let mut set = JoinSet::new();
        for &n in chunk {
            let (store, cid) = (store.clone(), cid.to_owned());
            set.spawn(async move { store.cleanup(&cid, n).await });
        }
        while let Some(r) = set.join_next().await {
            r.expect("clean task").map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Times issue_ticket + finish_serving of the newest ticket for `span`, in a
/// spawned task: (cycles, seconds).
async fn deep_cycles(store: &LockStore, cid: &str, span: Duration) -> Result<(u64, f64), String> {
    let (store, cid) = (store.clone(), cid.to_owned());
    tokio::spawn(async move { deep_loop(&store, &cid, span).await })
        .await
        .expect("deep-queue task panicked")
}

async fn deep_loop(store: &LockStore, cid: &str, span: Duration) -> Result<(u64, f64), String> {
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < span {
        let t = store
            .issue_ticket(cid, DEEP_LIFETIME)
            .await
            .map_err(|e| e.to_string())?;
        store
            .finish_serving(cid, t)
            .await
            .map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok((n, started.elapsed().as_secs_f64()))
}

/// The CLI's 2-process hot run, parsed.
struct CliRun {
    p50_ms: f64,
    p99_ms: f64,
    throughput: f64,
}

fn cli_hot(url: &str, failures: &mut Vec<String>) -> Result<CliRun, String> {
    let bin = std::env::var_os("TICKETLOCK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/ticketlock")
        });
    if !bin.is_file() {
        return Err(format!(
            "{} not found (scripts/bench.sh builds it)",
            bin.display()
        ));
    }
    let out = Command::new(&bin)
        .args(["simulate", "--redis", url, "--json"])
        .args(["--processes", "2", "--workers", "4", "--conversations", "1"])
        .args(["--messages", &CLI_MESSAGES.to_string()])
        .env_remove("RUST_LOG")
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
        format!(
            "simulate printed no JSON ({}, {e}): {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let int = |k: &str| json[k].as_u64().unwrap_or(u64::MAX);
    for k in ["order_violations", "overlaps", "lost_updates", "errors"] {
        if int(k) != 0 {
            failures.push(format!("CLI 2-process hot run: {k} = {}", json[k]));
        }
    }
    if !out.status.success() {
        failures.push(format!("CLI 2-process hot run exited with {}", out.status));
    }
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    Ok(CliRun {
        p50_ms: f(&json["handoff_ms"]["p50"]),
        p99_ms: f(&json["handoff_ms"]["p99"]),
        throughput: f(&json["throughput_per_s"]),
    })
}

// ---------------------------------------------------------------------------
// The benchmark

struct Bench {
    url: String,
    port: u16,
    admin: ConnectionManager,
    rows: Vec<Row>,
    failures: Vec<String>,
    /// Floor RTT (mean, p50).
    rtt: (Duration, Duration),
    /// Row 1's server work per uncontended cycle (FCALL): (µs, scripts,
    /// redis.calls).
    cycle_work: (f64, f64, f64),
}

impl Bench {
    fn row(&mut self, case: &str, figure: String, baseline: String, ratio: Option<f64>, t: Target) {
        self.rows.push(Row {
            case: case.into(),
            figure,
            baseline,
            ratio,
            target: t,
        });
    }

    async fn store(&self) -> LockStore {
        LockStore::from_url(&self.url)
            .await
            .expect("connecting the store")
    }

    fn redlock(&self) -> Locker {
        Locker::Redlock(rslock::LockManager::new(vec![self.url.clone()]))
    }

    /// The floor and rows 3 (uncontended): floor, ours and rslock in
    /// alternating rounds.
    async fn uncontended(&mut self) {
        stage("floor and uncontended cycles (ours, rslock)");
        let client = redis::Client::open(format!("{}/?protocol=resp3", self.url)).expect("url");
        let mut conn = client.get_connection_manager().await.expect("connect");
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg("return 1")
            .query_async(&mut conn)
            .await
            .expect("SCRIPT LOAD");
        let ours = Locker::Ticket(self.store().await, LockOptions::default());
        let peer = self.redlock();
        let watch = Arc::new(Watch::default());
        let solo = ["solo".to_owned()];
        let peer_solo = ["rslock-solo".to_owned()];
        // Warm-up: connections, script caches, allocators.
        floor(&conn, &sha, Duration::from_millis(200)).await;
        cycles(&ours, &solo, Duration::from_millis(200), &watch).await;
        cycles(&peer, &peer_solo, Duration::from_millis(200), &watch).await;
        let mut rtts = Vec::new();
        let (mut ours_rate, mut peer_rate) = (Vec::new(), Vec::new());
        // Short alternating slices: loopback RTT on a VM flips between a fast
        // and a slow regime (is the other vCPU awake?) for whole seconds.
        let slice = Duration::from_millis(250);
        for _ in 0..10 {
            rtts.extend(floor(&conn, &sha, slice).await);
            ours_rate.push(cycles(&ours, &solo, slice, &watch).await);
            peer_rate.push(cycles(&peer, &peer_solo, slice, &watch).await);
        }
        watch.report("uncontended", &mut self.failures);
        rtts.sort();
        let mean = rtts.iter().sum::<Duration>() / rtts.len() as u32;
        self.rtt = (mean, percentile(&rtts, 50.0));
        let ours_rate = ours_rate.iter().sum::<f64>() / ours_rate.len() as f64;
        let peer_rate = peer_rate.iter().sum::<f64>() / peer_rate.len() as f64;
        let half_floor = 1.0 / (2.0 * mean.as_secs_f64());
        self.row(
            "floor: EVALSHA `return 1`, 1 client, sequential",
            format!(
                "RTT mean {} (p50 {}, p99 {}) = {}",
                us(mean),
                us(self.rtt.1),
                us(percentile(&rtts, 99.0)),
                per_s(1.0 / mean.as_secs_f64())
            ),
            "(the baseline)".into(),
            None,
            Target::None,
        );
        self.row(
            "3 uncontended lock+release, Redis, vs floor/2",
            format!("{} cycles", per_s(ours_rate)),
            format!("floor/2 = {}", per_s(half_floor)),
            Some(ours_rate / half_floor),
            Target::AtLeast(0.9),
        );
        self.row(
            "3 uncontended (1 task): vs rslock",
            format!("{} cycles", per_s(ours_rate)),
            format!("rslock {} cycles", per_s(peer_rate)),
            Some(ours_rate / peer_rate),
            Target::AtLeast(1.0),
        );
    }

    /// Rows 1 and 2: the server's own time and `redis.call`s per uncontended
    /// lock + release (INFO commandstats), ours (Functions, as the store runs
    /// by default on Redis 7, and EVALSHA) against the reference pair.
    async fn server_time(&mut self) {
        stage("server time per uncontended cycle (ours: FCALL, EVALSHA; reference pair)");
        let client = redis::Client::open(format!("{}/?protocol=resp3", self.url)).expect("url");
        let conn = client.get_connection_manager().await.expect("connect");
        let mut shas = Vec::new();
        for code in [REFERENCE_ISSUE, REFERENCE_RELEASE] {
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(code)
                .query_async(&mut self.admin)
                .await
                .expect("SCRIPT LOAD reference");
            shas.push(sha);
        }
        let shas = (shas[0].clone(), shas[1].clone());
        let mut eval_config = StoreConfig::from_url(&self.url).expect("url");
        eval_config.script_mode = ScriptMode::Eval;
        let eval_store = LockStore::create(Some(&eval_config))
            .await
            .expect("connecting the EVALSHA store");
        let ours = [
            Locker::Ticket(self.store().await, LockOptions::default()),
            Locker::Ticket(eval_store, LockOptions::default()),
        ];
        let watch = Arc::new(Watch::default());
        let solo = ["server-time".to_owned()];
        for locker in &ours {
            cycles(locker, &solo, Duration::from_millis(200), &watch).await;
        }
        reference_cycles(&conn, &shas, Duration::from_millis(200)).await;
        // (work, cycles) for FCALL, EVALSHA, reference; alternating slices,
        // the stats reset before each, nothing else running.
        let mut totals = [(ServerWork::default(), 0u64); 3];
        let slice = Duration::from_millis(400);
        for _ in 0..3 {
            for (i, total) in totals.iter_mut().enumerate() {
                reset_stats(&mut self.admin).await;
                let done = match ours.get(i) {
                    Some(locker) => cycle_run(locker, &solo, slice, &watch).await.0,
                    None => reference_cycles(&conn, &shas, slice).await,
                };
                total.0.add(server_work(&mut self.admin).await);
                total.1 += done;
            }
        }
        watch.report("server time", &mut self.failures);
        let per_cycle = |(w, n): (ServerWork, u64)| {
            let n = n.max(1) as f64;
            (w.script_usec / n, w.inner_calls / n, w.script_calls / n)
        };
        let [fcall, eval, reference] = totals.map(per_cycle);
        self.cycle_work = fcall;
        let text = |(usec, inner, scripts): (f64, f64, f64)| {
            format!("{usec:.1} µs ({scripts:.0} scripts, {inner:.1} redis.calls)")
        };
        self.row(
            "1 server time per uncontended lock+release (FCALL)",
            text(fcall),
            format!("budget {SERVER_BUDGET_US} µs"),
            Some(fcall.0 / SERVER_BUDGET_US),
            Target::AtMost(1.0),
        );
        let reference_text = format!("reference pair: {}", text(reference));
        self.row(
            "1 server time per cycle vs the reference pair (FCALL)",
            text(fcall),
            reference_text.clone(),
            Some(fcall.0 / reference.0),
            Target::AtMost(1.5),
        );
        self.row(
            "1 server time per cycle vs the reference pair (EVALSHA)",
            text(eval),
            reference_text,
            Some(eval.0 / reference.0),
            Target::None,
        );
        self.row(
            "2 redis.calls per uncontended cycle (FCALL)",
            format!("{:.1}", fcall.1),
            format!("reference pair: {:.1}", reference.1),
            Some(fcall.1 / reference.1),
            Target::None,
        );
    }

    /// Rows 3 (many conversations): ours vs rslock vs the server's ceiling.
    async fn many(&mut self) {
        stage("many conversations (8 and 64 tasks, ours and rslock)");
        let ours = Locker::Ticket(self.store().await, LockOptions::default());
        let peer = self.redlock();
        let watch = Arc::new(Watch::default());
        let names = |prefix: &str, n: usize| -> Vec<String> {
            (0..n).map(|i| format!("{prefix}-{n}-{i}")).collect()
        };
        let slice = Duration::from_millis(800);
        // (tasks, ours?) -> (cycles/s per round, server CPU seconds, wall seconds)
        let mut runs: HashMap<(usize, bool), (Vec<f64>, f64, f64)> = HashMap::new();
        for n in [8, 64] {
            // Warm-up at this width.
            cycles(&ours, &names("many", n), Duration::from_millis(200), &watch).await;
            cycles(
                &peer,
                &names("rslock-many", n),
                Duration::from_millis(200),
                &watch,
            )
            .await;
        }
        for _ in 0..3 {
            for n in [8, 64] {
                for (is_ours, locker, prefix) in
                    [(true, &ours, "many"), (false, &peer, "rslock-many")]
                {
                    let cpu = server_cpu(&mut self.admin).await;
                    let wall = Instant::now();
                    let r = cycles(locker, &names(prefix, n), slice, &watch).await;
                    let wall = wall.elapsed().as_secs_f64();
                    let cpu = server_cpu(&mut self.admin).await - cpu;
                    let e = runs.entry((n, is_ours)).or_default();
                    e.0.push(r);
                    e.1 += cpu;
                    e.2 += wall;
                }
            }
        }
        // The server's own time per cycle at 64 tasks (is it what row 1
        // measured alone?).
        reset_stats(&mut self.admin).await;
        let (done, _) = cycle_run(
            &ours,
            &names("many", 64),
            Duration::from_millis(500),
            &watch,
        )
        .await;
        let wide = server_work(&mut self.admin).await;
        let wide_usec = wide.script_usec / done.max(1) as f64;
        watch.report("many conversations", &mut self.failures);

        stage("redis-benchmark: pipelined EVALSHA ceiling");
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg("return 1")
            .query_async(&mut self.admin)
            .await
            .expect("SCRIPT LOAD");
        let ceiling = match evalsha_ceiling(self.port, &sha) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("compare: {e}");
                None
            }
        };
        let busy = |r: &(Vec<f64>, f64, f64)| 100.0 * r.1 / r.2;
        for n in [8, 64] {
            let (o, p) = (&runs[&(n, true)], &runs[&(n, false)]);
            let ours_rate = o.0.iter().sum::<f64>() / o.0.len() as f64;
            let peer_rate = p.0.iter().sum::<f64>() / p.0.len() as f64;
            self.row(
                &format!("3 {n} tasks, own conversation each: vs rslock"),
                format!("{} cycles (server CPU {:.0}%)", per_s(ours_rate), busy(o)),
                format!(
                    "rslock {} cycles (server CPU {:.0}%)",
                    per_s(peer_rate),
                    busy(p)
                ),
                Some(ours_rate / peer_rate),
                if n == 64 {
                    Target::AtLeast(0.5)
                } else {
                    Target::AtLeast(1.0)
                },
            );
        }
        let o = &runs[&(64, true)];
        let ours_rate = o.0.iter().sum::<f64>() / o.0.len() as f64;
        self.row(
            "3 64 tasks: script calls vs server ceiling",
            format!(
                "{} (2/cycle; server {wide_usec:.1} µs/cycle)",
                per_s(2.0 * ours_rate)
            ),
            match ceiling {
                Some(c) => format!("redis-benchmark `return 1` -c 50 -P 16: {}", per_s(c)),
                None => "redis-benchmark failed".into(),
            },
            ceiling.map(|c| 2.0 * ours_rate / c),
            Target::None,
        );
    }

    /// Rows 4: hot conversation, 8 tasks over 2 stores, two wait times; and
    /// the CLI's 2-process run.
    async fn hot(&mut self) {
        stage("hot conversation (8 tasks, 2 stores; wait_time 1 s and 10 ms)");
        let stores = [self.store().await, self.store().await];
        let lockers = |wait: Duration| -> Vec<Locker> {
            stores
                .iter()
                .map(|s| Locker::Ticket(s.clone(), LockOptions::default().with_wait_time(wait)))
                .collect()
        };
        let waits = [Duration::from_secs(1), Duration::from_millis(10)];
        let watch = Arc::new(Watch::default());
        contend(
            &lockers(waits[0]),
            4,
            "hot",
            Duration::from_millis(300),
            &watch,
        )
        .await;
        let mut runs: Vec<Vec<Contended>> = vec![Vec::new(), Vec::new()];
        let span = Duration::from_millis(1500);
        // What the server does per grant, over all four runs.
        reset_stats(&mut self.admin).await;
        let mut grants = 0.0;
        for _ in 0..2 {
            for (i, wait) in waits.iter().enumerate() {
                let r = contend(&lockers(*wait), 4, "hot", span, &watch).await;
                grants += r.grants_per_s * span.as_secs_f64();
                runs[i].push(r);
            }
        }
        let work = server_work(&mut self.admin).await;
        watch.report("hot conversation", &mut self.failures);
        let merged: Vec<Contended> = runs.into_iter().map(merge).collect();
        // Against the mean: the RTT is bimodal here, so its p50 jumps between runs.
        let rtt = self.rtt.0;
        for (r, label) in merged.iter().zip(["1 s", "10 ms"]) {
            self.row(
                &format!("4 hot: 8 tasks/2 stores, 1 conv, wait_time {label}"),
                format!(
                    "hand-off {}, {} hand-offs",
                    r.latency_text(),
                    per_s(r.handoffs_per_s)
                ),
                format!("floor RTT mean {}", us(rtt)),
                Some(r.p(50.0).as_secs_f64() / rtt.as_secs_f64()),
                Target::AtMost(2.0),
            );
        }
        let grants = grants.max(1.0);
        let (base_usec, base_scripts, base_calls) = self.cycle_work;
        self.row(
            "4 hot: server work per grant (INFO commandstats)",
            format!(
                "{:.1} µs ({:.1} scripts, {:.1} redis.calls, {:.2} SUBSCRIBEs)",
                work.script_usec / grants,
                work.script_calls / grants,
                work.inner_calls / grants,
                work.subscribes / grants
            ),
            format!(
                "uncontended cycle: {base_usec:.1} µs ({base_scripts:.0} scripts, {base_calls:.1} redis.calls)"
            ),
            (base_usec > 0.0).then(|| work.script_usec / grants / base_usec),
            Target::None,
        );
        self.row(
            "4 hot: wait_time 10 ms vs 1 s (hand-offs/s)",
            format!(
                "{} (p50 {})",
                per_s(merged[1].handoffs_per_s),
                us(merged[1].p(50.0))
            ),
            format!(
                "{} (p50 {})",
                per_s(merged[0].handoffs_per_s),
                us(merged[0].p(50.0))
            ),
            Some(merged[1].handoffs_per_s / merged[0].handoffs_per_s),
            Target::Between(0.8, 1.25),
        );
        stage("hot conversation: CLI, 2 OS processes x 4 workers");
        match cli_hot(&self.url, &mut self.failures) {
            Ok(cli) => self.row(
                "4 hot: CLI simulate, 2 processes x 4 workers (wait 1 s)",
                format!(
                    "hand-off p50 {:.0} µs p99 {:.0} µs, {} msgs",
                    cli.p50_ms * 1000.0,
                    cli.p99_ms * 1000.0,
                    per_s(cli.throughput)
                ),
                format!("floor RTT mean {}", us(rtt)),
                Some(cli.p50_ms / 1000.0 / rtt.as_secs_f64()),
                Target::AtMost(2.5),
            ),
            Err(e) => {
                eprintln!("compare: CLI run failed: {e}");
                self.failures.push(format!("CLI 2-process hot run: {e}"));
            }
        }
    }

    /// Rows 6: deep queues (cost and memory), a 1-ticket conversation's
    /// memory, and cleanup.
    async fn deep(&mut self) {
        stage("deep queues (depth 1, 100, 10,000)");
        let store = self.store().await;
        let cid = |d: usize| format!("deep-{d}");
        let mut filled = Vec::new();
        for d in DEPTHS {
            match fill(&store, &cid(d), d - 1).await {
                Ok(numbers) => filled.push(numbers),
                Err(e) => {
                    self.failures.push(format!("deep queue {d}: {e}"));
                    for d in DEPTHS {
                        let _ = store.delete_lock(&cid(d)).await;
                    }
                    return;
                }
            }
        }
        let mut cost = [(0u64, 0f64); 3];
        let slice = Duration::from_millis(150);
        for round in 0..11 {
            for (i, d) in DEPTHS.iter().enumerate() {
                match deep_cycles(&store, &cid(*d), slice).await {
                    Ok((n, s)) if round > 0 => {
                        cost[i].0 += n;
                        cost[i].1 += s;
                    }
                    Ok(_) => {} // warm-up round
                    Err(e) => self.failures.push(format!("deep queue {d}: {e}")),
                }
            }
        }
        let per_cycle: Vec<Duration> = cost
            .iter()
            .map(|(n, s)| Duration::from_secs_f64(s / (*n).max(1) as f64))
            .collect();
        for (i, d) in DEPTHS.iter().enumerate().skip(1) {
            self.row(
                &format!("6 issue+finish at depth {d}"),
                format!("{} per cycle", us(per_cycle[i])),
                format!("depth 1: {}", us(per_cycle[0])),
                Some(per_cycle[i].as_secs_f64() / per_cycle[0].as_secs_f64()),
                if *d == 10_000 {
                    Target::AtMost(2.0)
                } else {
                    Target::None
                },
            );
        }

        stage("memory per waiting ticket, then cleanup");
        let mut per_ticket = Vec::new();
        for (i, d) in DEPTHS.iter().enumerate() {
            let cid = cid(*d);
            match fill(&store, &cid, 1).await {
                Ok(numbers) => filled[i].extend(numbers),
                Err(e) => self.failures.push(format!("deep queue {d}: {e}")),
            }
            let bytes = memory_usage(&mut self.admin, &conversation_key(&cid)).await;
            per_ticket.push((bytes, bytes as f64 / *d as f64));
            if let Err(e) = clean(&store, &cid, &filled[i]).await {
                self.failures.push(format!("cleanup of {cid}: {e}"));
            }
        }
        let (one_bytes, one) = per_ticket[0];
        for (d, (bytes, ours)) in DEPTHS.iter().zip(&per_ticket).skip(1) {
            self.row(
                &format!("6 Redis bytes per ticket, depth {d}"),
                format!("{ours:.0} B (1 key, {bytes} B)"),
                format!("depth 1: {one:.0} B ({one_bytes} B)"),
                Some(ours / one),
                if *d == 10_000 {
                    Target::AtMost(2.0)
                } else {
                    Target::None
                },
            );
        }
        // The common case: one `lock` (a renewing ticket with its request
        // id) on a fresh conversation.
        let guard = store
            .lock_with("memory-one", LockOptions::default())
            .await
            .expect("lock for the memory row");
        let bytes = memory_usage(&mut self.admin, &conversation_key("memory-one")).await;
        let fields: i64 = redis::cmd("HLEN")
            .arg(conversation_key("memory-one"))
            .query_async(&mut self.admin)
            .await
            .expect("HLEN");
        if let Err(e) = guard.release().await {
            self.failures
                .push(format!("release for the memory row: {e}"));
        }
        self.row(
            "6 Redis memory of a conversation with 1 ticket (`lock`)",
            format!("{bytes} B (1 key, {fields} fields)"),
            format!("budget {ONE_TICKET_BUDGET_BYTES} B"),
            Some(bytes as f64 / ONE_TICKET_BUDGET_BYTES),
            Target::AtMost(1.0),
        );
        let mut left = Vec::new();
        for d in DEPTHS {
            let key = conversation_key(&cid(d));
            let exists: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut self.admin)
                .await
                .expect("EXISTS");
            if exists {
                left.push(key);
            }
        }
        if !left.is_empty() {
            self.failures.push(format!(
                "keys left after cleaning up every deep-queue ticket: {left:?}"
            ));
        }
        self.row(
            "6 keys left after `cleanup` of every ticket",
            format!("{} of {}", left.len(), DEPTHS.len()),
            "0".into(),
            None,
            Target::None,
        );
    }

    /// Rows 5: the in-memory store vs a lock-per-key map of tokio mutexes,
    /// on a `current_thread` runtime (its own thread) and on the bench's
    /// `multi_thread` one.
    async fn memory_backend(&mut self) {
        stage("in-memory store vs HashMap<String, Arc<tokio::sync::Mutex<()>>>");
        let watch = Arc::new(Watch::default());
        let w = Arc::clone(&watch);
        let (a, b) = on_current_thread(move || async move { memory_solo(&w).await }).await;
        self.row(
            "5 in-memory uncontended lock+release, current_thread",
            format!("{} cycles", per_s(a)),
            format!("map of tokio Mutex: {}", per_s(b)),
            Some(a / b),
            Target::AtLeast(0.2),
        );
        let (a, b) = memory_solo(&watch).await;
        self.row(
            "5 in-memory uncontended lock+release, multi_thread",
            format!("{} cycles", per_s(a)),
            format!("map of tokio Mutex: {}", per_s(b)),
            Some(a / b),
            Target::AtLeast(0.2),
        );
        let ours = Locker::Ticket(LockStore::in_memory(), LockOptions::default());
        let base = Locker::mutex_map();
        let names: Vec<String> = (0..8).map(|i| format!("own-{i}")).collect();
        cycles(&ours, &names, Duration::from_millis(200), &watch).await;
        cycles(&base, &names, Duration::from_millis(200), &watch).await;
        let (mut a, mut b) = (0.0, 0.0);
        for _ in 0..5 {
            a += cycles(&ours, &names, Duration::from_millis(300), &watch).await / 5.0;
            b += cycles(&base, &names, Duration::from_millis(300), &watch).await / 5.0;
        }
        self.row(
            "5 in-memory 8 tasks, own conversation each, multi_thread",
            format!("{} cycles", per_s(a)),
            format!("map of tokio Mutex: {}", per_s(b)),
            Some(a / b),
            Target::AtLeast(0.2),
        );
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let span = Duration::from_millis(500);
            a.push(contend(std::slice::from_ref(&ours), 8, "hot", span, &watch).await);
            b.push(contend(std::slice::from_ref(&base), 8, "hot", span, &watch).await);
        }
        watch.report("in-memory", &mut self.failures);
        let (a, b) = (merge(a), merge(b));
        self.row(
            "5 in-memory hot: 8 tasks, 1 conversation, multi_thread",
            format!(
                "{} hand-offs (p50 {})",
                per_s(a.handoffs_per_s),
                us(a.p(50.0))
            ),
            format!(
                "tokio Mutex: {} (p50 {})",
                per_s(b.handoffs_per_s),
                us(b.p(50.0))
            ),
            Some(a.handoffs_per_s / b.handoffs_per_s),
            Target::None,
        );
    }

    /// Rows 6 (contended): 8 tasks on one resource, ours vs rslock; the
    /// fairness bar is ours.
    async fn peer_contended(&mut self) {
        stage("contended peer: 8 tasks on one resource, ours and rslock (3 s each)");
        let ours = Locker::Ticket(self.store().await, LockOptions::default());
        let peer = self.redlock();
        let watch = Arc::new(Watch::default());
        let span = Duration::from_secs(3);
        let a = contend(std::slice::from_ref(&ours), 8, "peer", span, &watch).await;
        let b = contend(std::slice::from_ref(&peer), 8, "rslock-peer", span, &watch).await;
        watch.report("contended peer", &mut self.failures);
        let ratio = match (a.handoff.is_empty(), b.handoff.is_empty()) {
            (false, false) => Some(a.p(50.0).as_secs_f64() / b.p(50.0).as_secs_f64()),
            _ => None,
        };
        self.row(
            "6 contended (8 tasks, 1 resource): hand-off",
            format!(
                "{}, {} hand-offs",
                a.latency_text(),
                per_s(a.handoffs_per_s)
            ),
            format!(
                "rslock {}, {} hand-offs",
                b.latency_text(),
                per_s(b.handoffs_per_s)
            ),
            ratio,
            Target::None,
        );
        let worst = |c: &Contended| c.waits.last().copied().unwrap_or_default().as_secs_f64();
        self.row(
            "6 contended: wait from asking to inside (ratio: max)",
            a.wait_text(),
            format!("rslock {}", b.wait_text()),
            (worst(&b) > 0.0).then(|| worst(&a) / worst(&b)),
            Target::None,
        );
        let fairness = |c: &Contended| {
            let (min, max) = c.spread();
            (
                min,
                max,
                if max == 0 {
                    0.0
                } else {
                    min as f64 / max as f64
                },
            )
        };
        let (amin, amax, af) = fairness(&a);
        let (bmin, bmax, bf) = fairness(&b);
        self.row(
            "6 contended: acquisitions per task in 3 s, min–max",
            format!(
                "{amin}–{amax} (min/max {af:.2}; {} in all)",
                per_s(a.grants_per_s)
            ),
            format!(
                "rslock {bmin}–{bmax} (min/max {bf:.2}; {} in all)",
                per_s(b.grants_per_s)
            ),
            Some(af),
            Target::AtLeast(0.9),
        );
        if a.epochs > 0 {
            eprintln!(
                "compare: contended peer: our queue emptied {} times",
                a.epochs
            );
        }
    }
}

/// One task locking and releasing one conversation, in memory and on the
/// baseline map, in alternating slices on the runtime this runs on (both
/// created there): cycles per second, (ours, baseline).
async fn memory_solo(watch: &Arc<Watch>) -> (f64, f64) {
    let ours = Locker::Ticket(LockStore::in_memory(), LockOptions::default());
    let base = Locker::mutex_map();
    let solo = ["solo".to_owned()];
    cycles(&ours, &solo, Duration::from_millis(200), watch).await;
    cycles(&base, &solo, Duration::from_millis(200), watch).await;
    let (mut a, mut b) = (0.0, 0.0);
    for _ in 0..5 {
        a += cycles(&ours, &solo, Duration::from_millis(300), watch).await / 5.0;
        b += cycles(&base, &solo, Duration::from_millis(300), watch).await / 5.0;
    }
    (a, b)
}

/// Runs `make()`'s future on a `current_thread` runtime of its own, on a
/// thread of its own, and awaits its output.
async fn on_current_thread<F, Fut, T>(make: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("current_thread runtime");
        let _ = tx.send(runtime.block_on(make()));
    });
    let out = rx.await.expect("the current_thread bench thread panicked");
    thread
        .join()
        .expect("the current_thread bench thread panicked");
    out
}

fn merge(runs: Vec<Contended>) -> Contended {
    let n = runs.len().max(1) as f64;
    let mut out = Contended {
        handoffs_per_s: 0.0,
        handoff: Vec::new(),
        waits: Vec::new(),
        grants_per_s: 0.0,
        per_task: Vec::new(),
        epochs: 0,
    };
    for r in runs {
        out.handoffs_per_s += r.handoffs_per_s / n;
        out.grants_per_s += r.grants_per_s / n;
        out.handoff.extend(r.handoff);
        out.waits.extend(r.waits);
        out.per_task.extend(r.per_task);
        out.epochs += r.epochs;
    }
    out.handoff.sort();
    out.waits.sort();
    out
}

/// nproc, CPU model and redis-server version, for the report.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let redis = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let redis = redis
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or("unknown");
    format!("{cpus} CPUs ({model}), redis-server {redis}")
}

/// The 1-minute load average (other work on the machine skews every figure).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs bench
    // targets without it: stay out of the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "compare: skipped (run it with `cargo bench --bench compare` or scripts/bench.sh)"
        );
        return;
    }
    let started = Instant::now();
    let load_before = load();
    let server = support::RedisServer::start();
    let url = server.url();
    eprintln!(
        "compare: redis-server pid {} on {url} (stopped at the end)",
        server.pid()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (table, failures) = runtime.block_on(async {
        let admin = redis::Client::open(url.as_str())
            .expect("url")
            .get_connection_manager()
            .await
            .expect("admin connection");
        let mut bench = Bench {
            url: url.clone(),
            port: server.port(),
            admin,
            rows: Vec::new(),
            failures: Vec::new(),
            rtt: (Duration::ZERO, Duration::ZERO),
            cycle_work: (0.0, 0.0, 0.0),
        };
        bench.uncontended().await;
        bench.server_time().await;
        bench.many().await;
        bench.hot().await;
        bench.deep().await;
        bench.memory_backend().await;
        bench.peer_contended().await;
        let left = leftover_lock_keys(&mut bench.admin).await;
        if !left.is_empty() {
            bench
                .failures
                .push(format!("KEYS lock:* not empty at the end: {left:?}"));
        }
        bench.row(
            "invariants: overlaps, order, errors; `KEYS lock:*` at the end",
            format!("{} broken; {} keys left", bench.failures.len(), left.len()),
            "0; 0".into(),
            None,
            Target::None,
        );
        (render(&bench.rows), bench.failures)
    });
    drop(runtime);
    drop(server); // stops redis-server (before any exit below)

    let table = format!(
        "Machine: {}; 1-min load average {load_before} before, {} after\n\n{table}",
        machine(),
        load()
    );
    println!("\n{table}");
    let report = std::env::var_os("BENCH_REPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/compare.md")
        });
    if let Some(dir) = report.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&report, &table) {
        Ok(()) => eprintln!("compare: table written to {}", report.display()),
        Err(e) => eprintln!("compare: could not write {}: {e}", report.display()),
    }
    eprintln!("compare: {:.0} s", started.elapsed().as_secs_f64());
    if !failures.is_empty() {
        eprintln!("compare: INVARIANTS BROKEN:");
        for f in &failures {
            eprintln!("  - {f}");
        }
        std::process::exit(1);
    }
}
