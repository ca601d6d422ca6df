//! Holding up under faults: processes SIGKILLed while waiting or inside
//! their critical section, fencing tokens across processes, a Redis server
//! killed and restarted or frozen under load, and a linearizability-style
//! check of the grant/release history of four processes.
//! Long on purpose: each scenario sets up its own processes and servers and
//! reads top to bottom; they share the harness, not each other's steps.
//!
//! The other processes are `examples/participant.rs` (built once per test
//! binary, see [`participant_bin`]); each is killed by its own pid when its
//! handle drops. Randomness (who is killed, and when) comes from one seed,
//! printed by every test that uses it; `FAULTS_SEED=<n>` replays a run.
//!
//! Servers: tests that only need *a* Redis share the harness's server
//! (`support::redis_url()`, own key prefix each); the restart and the
//! freeze get private servers (`RedisServer::start()`), on 127.0.0.1 only.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::AsyncCommands;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use support::{unique_prefix, RedisServer};
use ticketlock::{LockError, LockOptions, LockStore, StoreConfig};

// --- helpers ------------------------------------------------------------------

fn participant_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| support::example_binary("participant"))
}

/// Builds the participant before a test takes any lock or starts a clock:
/// the build may wait for other cargo processes.
fn build_participant_first() {
    tokio::task::block_in_place(|| {
        participant_bin();
    });
}

/// The run's seed: `FAULTS_SEED` if set, else the clock.
fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
    })
}

/// A generator of its own for each test, from the run's seed.
fn rng_for(test: &str) -> StdRng {
    let seed = seed();
    println!("{test}: seed {seed} (FAULTS_SEED={seed} replays it)");
    let salt = test.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    StdRng::seed_from_u64(seed ^ salt)
}

async fn store(url: &str, prefix: &str, socket_timeout: f64) -> LockStore {
    let mut config = StoreConfig::redis(url);
    config.key_prefix = Some(prefix.to_owned());
    config.socket_timeout = Some(socket_timeout);
    LockStore::create(Some(&config))
        .await
        .expect("connecting a store")
}

async fn raw(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("raw client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

/// Every key of the prefix (SCAN, so expired keys are not reported).
async fn keys_with_prefix(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut cursor = 0_u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Waits until the conversation's queue holds `n` live tickets and returns
/// the highest number (the newest ticket).
async fn wait_for_queue(store: &LockStore, cid: &str, n: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lock = store.get_lock(cid).await.expect("get_lock");
        let tickets: Vec<u64> = lock
            .as_ref()
            .map(|l| l.tickets().iter().map(|t| t.number()).collect())
            .unwrap_or_default();
        if tickets.len() == n {
            return tickets.into_iter().max().expect("n > 0");
        }
        assert!(
            Instant::now() < deadline,
            "the queue of {cid} never held {n} tickets (it holds {tickets:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A participant process; SIGKILLed by its pid when dropped.
struct Participant {
    name: String,
    child: Child,
    pid: u32,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    /// Every line read so far, stdout and stderr (for failure messages).
    transcript: Arc<Mutex<Vec<String>>>,
}

impl Participant {
    fn spawn(name: &str, url: &str, prefix: &str, cid: &str, extra: &[&str]) -> Participant {
        let mut child = Command::new(participant_bin())
            .args(["--redis", url, "--prefix", prefix, "--conversation", cid])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning the participant");
        let pid = child.id().expect("participant pid");
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        {
            let transcript = transcript.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    transcript.lock().unwrap().push(line.clone());
                    let _ = tx.send((Instant::now(), line));
                }
            });
        }
        {
            let transcript = transcript.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    transcript.lock().unwrap().push(format!("stderr: {line}"));
                }
            });
        }
        Participant {
            name: name.to_owned(),
            child,
            pid,
            lines,
            transcript,
        }
    }

    fn transcript(&self) -> String {
        self.transcript.lock().unwrap().join("\n")
    }

    /// Reads lines until one starts with `word`; returns when it was read
    /// and its arguments.
    async fn expect(&mut self, word: &str, within: Duration) -> (Instant, Vec<String>) {
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((at, line))) => {
                    let mut parts = line.split_whitespace();
                    if parts.next() == Some(word) {
                        return (at, parts.map(str::to_owned).collect());
                    }
                }
                Ok(None) => panic!(
                    "{} (pid {}) ended without printing {word:?}:\n{}",
                    self.name,
                    self.pid,
                    self.transcript()
                ),
                Err(_) => panic!(
                    "{} (pid {}) did not print {word:?} within {within:?}:\n{}",
                    self.name,
                    self.pid,
                    self.transcript()
                ),
            }
        }
    }

    /// SIGKILL, by pid.
    fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL participant");
    }

    async fn wait(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the participant"),
            Err(_) => panic!(
                "{} (pid {}) did not exit within {within:?}:\n{}",
                self.name,
                self.pid,
                self.transcript()
            ),
        }
    }

    /// Waits for a clean exit and returns the whole transcript.
    async fn finish(&mut self, within: Duration) -> Vec<String> {
        let status = self.wait(within).await;
        // Let the readers drain the pipes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            status.success(),
            "{} (pid {}) exited with {status}:\n{}",
            self.name,
            self.pid,
            self.transcript()
        );
        self.transcript.lock().unwrap().clone()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

// --- a. waiters SIGKILLed while they wait -----------------------------------------

/// A waiter process that dies stops blocking the queue one dead-waiter
/// timeout (1 s here) after its last check-in; the next live waiter is
/// served within that plus a margin, and dead waiters are never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_waiters_stop_blocking_within_the_dead_waiter_timeout() {
    build_participant_first();
    let mut rng = rng_for("killed_waiters");
    let url = support::redis_url();
    let prefix = unique_prefix("deadwaiter");
    let store = store(&url, &prefix, 5.0).await;
    let cid = "conv";
    let holder = store
        .lock_with(
            cid,
            LockOptions::default().with_lifetime(Duration::from_secs(30)),
        )
        .await
        .expect("holder");

    // Three waiter processes queue behind the holder, one at a time so the
    // ticket numbers are known.
    let mut waiters = Vec::new();
    for i in 0..3 {
        let p = Participant::spawn(
            &format!("waiter {i}"),
            &url,
            &prefix,
            cid,
            &[
                "--role",
                "wait",
                "--dead-waiter-ms",
                "1000",
                "--lifetime-ms",
                "10000",
                "--hold-ms",
                "100",
                "--max-seconds",
                "30",
            ],
        );
        let ticket = wait_for_queue(&store, cid, i + 2).await;
        waiters.push((p, ticket));
    }

    // The waiter right behind the holder always dies (so the recovery is
    // measured against a dead head), and maybe one more; at random moments
    // in the next 800 ms. The holder releases 50-300 ms after the last kill.
    let mut victims = vec![0_usize];
    if rng.random_bool(0.5) {
        victims.push(rng.random_range(1..3));
    }
    let mut kills: Vec<(Duration, usize)> = victims
        .iter()
        .map(|&v| (Duration::from_millis(rng.random_range(0..800)), v))
        .collect();
    kills.sort();
    let release_after =
        kills.last().expect("a victim").0 + Duration::from_millis(rng.random_range(50..300));
    println!(
        "killed_waiters: tickets {:?}; kills (after, waiter) {kills:?}; release after {release_after:?}",
        waiters.iter().map(|(_, t)| *t).collect::<Vec<_>>()
    );

    let start = Instant::now();
    let mut killed_at = HashMap::new();
    for &(after, v) in &kills {
        tokio::time::sleep_until(start + after).await;
        waiters[v].0.kill();
        killed_at.insert(v, Instant::now());
    }
    tokio::time::sleep_until(start + release_after).await;
    let released_at = Instant::now();
    holder.release().await.expect("holder release");

    // The live waiters are served in ticket order, the first one within the
    // dead-waiter timeout + margin of the release.
    let live: Vec<usize> = (0..3).filter(|i| !victims.contains(i)).collect();
    let mut previous_release = released_at;
    for (n, &i) in live.iter().enumerate() {
        let (p, ticket) = &mut waiters[i];
        let (acquired_at, args) = p.expect("acquired", Duration::from_secs(10)).await;
        assert_eq!(
            args[0],
            ticket.to_string(),
            "waiter {i} was served a ticket that is not its own:\n{}",
            p.transcript()
        );
        let waited = acquired_at - previous_release;
        if n == 0 {
            println!(
                "killed_waiters: dead-waiter recovery {} (release to the next live waiter's grant; {} dead waiter(s) ahead of it)",
                ms(waited),
                victims.iter().filter(|&&v| v < i).count()
            );
            // A dead waiter stops blocking one dead-waiter timeout after
            // its last check-in (a grant does not extend it).
            assert!(
                acquired_at - killed_at[&0] < Duration::from_millis(2000),
                "a dead waiter blocked the queue {:?} after it was killed",
                acquired_at - killed_at[&0]
            );
            println!(
                "killed_waiters: the next live waiter was served {} after the first dead waiter was killed (its last check-in was earlier still; dead-waiter timeout 1000 ms)",
                ms(acquired_at - killed_at[&0])
            );
            assert!(
                waited < Duration::from_millis(2500),
                "the next live waiter was served {waited:?} after the release (dead-waiter timeout 1 s)"
            );
        }
        let (released, _) = p.expect("released", Duration::from_secs(5)).await;
        previous_release = released;
        p.finish(Duration::from_secs(5)).await;
    }
    for &v in &victims {
        let (p, _) = &mut waiters[v];
        let status = p.wait(Duration::from_secs(5)).await;
        assert!(!status.success(), "a killed waiter exited cleanly");
        let transcript = p.transcript();
        assert!(
            !transcript.contains("acquired"),
            "a dead waiter was served:\n{transcript}"
        );
    }
    // Dead waiters queued behind the last live one are gone one dead-waiter
    // timeout after their last check-in; nothing outlives that.
    let deadline = Instant::now() + Duration::from_millis(2500);
    loop {
        store.update_lock(cid).await.expect("update_lock");
        match store.get_lock(cid).await.expect("get_lock") {
            None => break,
            Some(lock) if lock.tickets().is_empty() => break,
            Some(lock) => {
                assert!(Instant::now() < deadline, "tickets left behind: {lock:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

// --- b. a holder SIGKILLed inside its critical section -----------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_inside_its_section_delays_the_queue_by_its_lease_only() {
    build_participant_first();
    let mut rng = rng_for("killed_holder");
    let url = support::redis_url();
    let prefix = unique_prefix("deadholder");
    let store = store(&url, &prefix, 5.0).await;
    let mut conn = raw(&url).await;
    let cid = "conv";

    let mut holder = Participant::spawn(
        "holder",
        &url,
        &prefix,
        cid,
        &[
            "--role",
            "hold",
            "--lifetime-ms",
            "1000",
            "--max-seconds",
            "30",
        ],
    );
    let (granted, _) = holder.expect("acquired", Duration::from_secs(15)).await;

    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let options = LockOptions::default()
                .with_lifetime(Duration::from_secs(10))
                .with_timeout(Duration::from_secs(10));
            let result = store.lock_with("conv", options).await;
            (result, Instant::now())
        })
    };
    wait_for_queue(&store, cid, 2).await;

    // While the lock is held and a waiter queued, every key has a TTL.
    let keys = keys_with_prefix(&mut conn, &prefix).await;
    assert_eq!(
        keys.len(),
        1,
        "expected the conversation's one key: {keys:?}"
    );
    for key in &keys {
        let ttl: i64 = conn.pttl(key).await.expect("PTTL");
        assert!(ttl > 0, "{key} has PTTL {ttl} while the lock is held");
    }

    let kill_after = Duration::from_millis(rng.random_range(50..400));
    tokio::time::sleep_until(granted + kill_after).await;
    holder.kill();
    println!("killed_holder: SIGKILL {kill_after:?} after the grant");

    let (result, served_at) = waiter.await.expect("waiter task");
    let guard = result.expect("the waiter was not served after the dead holder's lease");
    let after = served_at - granted;
    println!(
        "killed_holder: holder-kill recovery: the waiter was served {} after the dead holder's grant (lease 1000 ms)",
        ms(after)
    );
    assert!(
        after > Duration::from_millis(800),
        "served {after:?} after the grant, before the 1 s lease ran out"
    );
    assert!(
        after < Duration::from_millis(2500),
        "served {after:?} after the grant (lease 1 s)"
    );

    for key in keys_with_prefix(&mut conn, &prefix).await {
        let ttl: i64 = conn.pttl(&key).await.expect("PTTL");
        assert!(ttl > 0, "{key} has PTTL {ttl} while the lock is held");
    }
    guard.release().await.expect("release");
    let left = keys_with_prefix(&mut conn, &prefix).await;
    assert!(
        left.is_empty(),
        "keys left after everyone released: {left:?}"
    );

    let status = holder.wait(Duration::from_secs(5)).await;
    assert!(!status.success());
    assert!(
        !holder.transcript().contains("released"),
        "{}",
        holder.transcript()
    );
}

// --- c. fencing tokens across processes ---------------------------------------------

/// One parsed entry of a participant's Redis log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: String,
    ticket: u64,
    fence: u64,
    pid: u32,
    us: u128,
}

fn parse_log(log: &[String]) -> Vec<Entry> {
    log.iter()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 5, "malformed log line {line:?}");
            Entry {
                kind: f[0].to_owned(),
                ticket: f[1].parse().expect("ticket"),
                fence: f[2].parse().expect("fence"),
                pid: f[3].parse().expect("pid"),
                us: f[4].parse().expect("µs"),
            }
        })
        .collect()
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// 1,000 grants by two processes, interleaved with `delete_lock` calls and
/// with grants left to expire: in grant order (the log each holder appends
/// to inside its section), the fencing tokens strictly increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_over_processes_deletes_and_expiries() {
    build_participant_first();
    let mut rng = rng_for("fencing");
    let url = support::redis_url();
    let prefix = unique_prefix("fencing");
    let store = store(&url, &prefix, 5.0).await;
    let mut conn = raw(&url).await;
    let cid = "conv";
    let log_key = format!("{prefix}log");
    const PER_PROCESS: u64 = 500;

    let mut participants: Vec<Participant> = (0..2)
        .map(|i| {
            Participant::spawn(
                &format!("looper {i}"),
                &url,
                &prefix,
                cid,
                &[
                    "--role",
                    "loop",
                    "--count",
                    &PER_PROCESS.to_string(),
                    "--lifetime-ms",
                    "5000",
                    "--log-key",
                    &log_key,
                    "--check-held",
                    "--max-seconds",
                    "50",
                ],
            )
        })
        .collect();
    for p in &mut participants {
        p.expect("ready", Duration::from_secs(15)).await;
    }

    // Meanwhile: deletes, and grants with a 150 ms lease held for 300 ms.
    let (mut deletes, mut expiring, mut expired_releases) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(45);
    let me = std::process::id();
    // Deletes and expiring grants take turns (which comes first is random).
    let mut delete_now = rng.random_bool(0.5);
    loop {
        let len: u64 = conn.llen(&log_key).await.expect("LLEN");
        if len >= 2 * 2 * PER_PROCESS || Instant::now() >= deadline || deletes + expiring >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
        if delete_now {
            store.delete_lock(cid).await.expect("delete_lock");
            deletes += 1;
        } else {
            let options = LockOptions::default()
                .with_lifetime(Duration::from_millis(150))
                .with_timeout(Duration::from_secs(10));
            let guard = store.lock_with(cid, options).await.expect("expiring grant");
            let (ticket, fence) = (guard.ticket(), guard.fencing_token());
            let _: u64 = conn
                .rpush(
                    &log_key,
                    format!("grant {ticket} {fence} {me} {}", now_us()),
                )
                .await
                .expect("RPUSH");
            if !guard.is_held().await.expect("is_held") {
                let _: u64 = conn
                    .rpush(&log_key, format!("late {ticket} {fence} {me} {}", now_us()))
                    .await
                    .expect("RPUSH");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            if matches!(guard.release().await, Err(LockError::Expired { .. })) {
                expired_releases += 1;
            }
            expiring += 1;
        }
        delete_now = !delete_now;
    }
    let mut acquired_lines = 0;
    for p in &mut participants {
        let transcript = p.finish(Duration::from_secs(50)).await;
        // Within one process the tokens increase too.
        let fences: Vec<u64> = transcript
            .iter()
            .filter_map(|l| l.strip_prefix("acquired "))
            .map(|rest| {
                rest.split(' ')
                    .nth(1)
                    .expect("fence")
                    .parse()
                    .expect("fence")
            })
            .collect();
        assert_eq!(fences.len() as u64, PER_PROCESS, "{}", p.name);
        assert!(
            fences.windows(2).all(|w| w[0] < w[1]),
            "{}: fences not increasing",
            p.name
        );
        acquired_lines += fences.len();
    }

    let log: Vec<String> = conn.lrange(&log_key, 0, -1).await.expect("LRANGE");
    let entries = parse_log(&log);
    let late: HashSet<u64> = entries
        .iter()
        .filter(|e| e.kind == "late")
        .map(|e| e.fence)
        .collect();
    let grants: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == "grant" && !late.contains(&e.fence))
        .collect();
    let all_grants = entries.iter().filter(|e| e.kind == "grant").count();
    println!(
        "fencing: {all_grants} grants ({acquired_lines} by the 2 processes, {expiring} with a 150 ms lease left to expire, {expired_releases} of whose releases found them expired), {deletes} delete_lock calls, {} grants logged after their lease was gone (left out)",
        late.len()
    );
    assert_eq!(all_grants, acquired_lines + expiring);
    assert!(all_grants >= 1000);
    assert!(
        deletes > 0 && expiring > 0,
        "no deletes or no expiries happened"
    );
    for pair in grants.windows(2) {
        assert!(
            pair[0].fence < pair[1].fence,
            "fencing token went down in grant order: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    let _: () = conn.del(&log_key).await.expect("DEL");
    store.delete_lock(cid).await.expect("delete_lock");
}

// --- d/e. the server restarted or frozen under load ----------------------------------

/// Shared by the tasks of [`hammer`]: who is inside, and what happened.
#[derive(Default)]
struct Monitor {
    next_id: AtomicU64,
    /// Sections inside now (by id).
    inside: Mutex<Vec<u64>>,
    /// (entering section, section already inside).
    overlaps: Mutex<Vec<(u64, u64)>>,
    /// Sections whose release said the lease was still valid.
    valid: Mutex<HashSet<u64>>,
    /// Sections whose release found the lease gone.
    lost: AtomicU64,
    /// Every failed call.
    failures: Mutex<Vec<Failure>>,
    /// Successful critical sections: (task, when the release returned).
    successes: Mutex<Vec<(usize, Instant)>>,
    /// Counter generation (bumped after a restart wiped the data).
    generation: AtomicU64,
    /// Successful non-atomic increments per generation.
    sets: Mutex<BTreeMap<u64, u64>>,
}

#[derive(Debug)]
struct Failure {
    task: usize,
    what: &'static str,
    started: Instant,
    ended: Instant,
    error: String,
    retryable: bool,
    expired: bool,
}

impl Monitor {
    fn fail(&self, task: usize, what: &'static str, started: Instant, e: &LockError) {
        self.failures.lock().unwrap().push(Failure {
            task,
            what,
            started,
            ended: Instant::now(),
            error: e.to_string(),
            retryable: e.is_retryable(),
            expired: matches!(e, LockError::Expired { .. }),
        });
    }

    /// Overlapping pairs of sections that both kept their lease to the end.
    fn violations(&self) -> Vec<(u64, u64)> {
        let valid = self.valid.lock().unwrap();
        self.overlaps
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, b)| valid.contains(a) && valid.contains(b))
            .copied()
            .collect()
    }
}

/// Bound on any single call before it counts as a hang.
const HANG: Duration = Duration::from_secs(20);

/// `stores.len()` tasks loop lock / GET counter / SET counter + 1 / release
/// on one conversation until `stop_at` (at most 5,000 rounds each).
fn hammer(
    stores: Vec<LockStore>,
    probe: ConnectionManager,
    prefix: String,
    options: LockOptions,
    monitor: Arc<Monitor>,
    stop_at: Instant,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    stores
        .into_iter()
        .enumerate()
        .map(|(task, store)| {
            let (mut probe, monitor, prefix) = (probe.clone(), monitor.clone(), prefix.clone());
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(task as u64));
            tokio::spawn(async move {
                for _ in 0..5_000 {
                    if Instant::now() >= stop_at {
                        break;
                    }
                    let started = Instant::now();
                    let guard =
                        match tokio::time::timeout(HANG, store.lock_with("conv", options)).await {
                            Err(_) => panic!("task {task}: lock_with hangs (> {HANG:?})"),
                            Ok(Err(e)) => {
                                monitor.fail(task, "lock_with", started, &e);
                                tokio::time::sleep(Duration::from_millis(25)).await;
                                continue;
                            }
                            Ok(Ok(guard)) => guard,
                        };
                    let id = monitor.next_id.fetch_add(1, Ordering::SeqCst);
                    {
                        let mut inside = monitor.inside.lock().unwrap();
                        let mut overlaps = monitor.overlaps.lock().unwrap();
                        overlaps.extend(inside.iter().map(|&other| (id, other)));
                        inside.push(id);
                    }
                    // The deliberately non-atomic increment (no INCR).
                    let generation = monitor.generation.load(Ordering::SeqCst);
                    let key = format!("{prefix}counter{generation}");
                    if let Ok(Ok(value)) =
                        tokio::time::timeout(HANG, probe.get::<_, Option<u64>>(&key)).await
                    {
                        tokio::time::sleep(Duration::from_millis(rng.random_range(0..3))).await;
                        let set = probe.set::<_, _, ()>(&key, value.unwrap_or(0) + 1);
                        if let Ok(Ok(())) = tokio::time::timeout(HANG, set).await {
                            *monitor.sets.lock().unwrap().entry(generation).or_default() += 1;
                        }
                    }
                    monitor.inside.lock().unwrap().retain(|&other| other != id);
                    let started = Instant::now();
                    match tokio::time::timeout(HANG, guard.release()).await {
                        Err(_) => panic!("task {task}: release hangs (> {HANG:?})"),
                        Ok(Ok(())) => {
                            monitor.valid.lock().unwrap().insert(id);
                            monitor
                                .successes
                                .lock()
                                .unwrap()
                                .push((task, Instant::now()));
                        }
                        Ok(Err(e)) => {
                            if matches!(e, LockError::Expired { .. }) {
                                monitor.lost.fetch_add(1, Ordering::SeqCst);
                            }
                            monitor.fail(task, "release", started, &e);
                        }
                    }
                }
            })
        })
        .collect()
}

async fn probe_connection(url: &str, timeout: Duration) -> ConnectionManager {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    redis::Client::open(url)
        .expect("probe client")
        .get_connection_manager_with_config(config)
        .await
        .expect("probe connection")
}

/// Checks shared by the restart and the freeze: every failure during the
/// fault came back in time (`bound` for `release`, `lock_bound` for
/// `lock_with`) and retryable (or `Expired`, for a ticket the fault
/// removed), every task was served again after it, and no two sections that
/// kept their lease overlapped. Returns the recovery time (fault over ->
/// every task served once more).
fn check_fault_run(
    test: &str,
    monitor: &Monitor,
    tasks: usize,
    fault_at: Instant,
    fault_over: Instant,
    (bound, lock_bound): (Duration, Duration),
) -> Duration {
    let failures = monitor.failures.lock().unwrap();
    let mut slowest: BTreeMap<&str, Duration> = BTreeMap::new();
    for f in failures.iter() {
        assert!(
            f.retryable || f.expired,
            "{test}: task {} {}: a failure that is neither retryable nor Expired: {}",
            f.task,
            f.what,
            f.error
        );
        // Measured from the start of the fault for calls already running.
        let took = f.ended - f.started.max(fault_at);
        let slot = slowest.entry(f.what).or_default();
        *slot = (*slot).max(took);
        let bound = if f.what == "lock_with" {
            lock_bound
        } else {
            bound
        };
        assert!(
            took <= bound,
            "{test}: task {} {} took {took:?} to fail (bound {bound:?}): {}",
            f.task,
            f.what,
            f.error
        );
    }
    let slowest: BTreeMap<&str, String> = slowest.into_iter().map(|(k, d)| (k, ms(d))).collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for f in failures.iter() {
        let kind = if f.expired {
            "expired".to_owned()
        } else {
            // The error's first words are enough to tell kinds apart.
            f.error.split(':').skip(1).take(1).collect::<String>()
        };
        *kinds
            .entry(format!("{} {}", f.what, kind.trim()))
            .or_default() += 1;
    }
    let successes = monitor.successes.lock().unwrap();
    let mut recovered = Duration::ZERO;
    for task in 0..tasks {
        let first = successes
            .iter()
            .filter(|(t, at)| *t == task && *at > fault_over)
            .map(|(_, at)| *at)
            .min()
            .unwrap_or_else(|| {
                panic!("{test}: task {task} was never served after the fault: {failures:#?}")
            });
        recovered = recovered.max(first - fault_over);
    }
    let violations = monitor.violations();
    println!(
        "{test}: {} sections kept their lease, {} lost it, {} overlaps in all, {} between sections that kept their lease; {} failed calls {kinds:?}, slowest failure {slowest:?}; every task served again {} after the fault ended",
        monitor.valid.lock().unwrap().len(),
        monitor.lost.load(Ordering::SeqCst),
        monitor.overlaps.lock().unwrap().len(),
        violations.len(),
        failures.len(),
        ms(recovered)
    );
    assert!(
        violations.is_empty(),
        "{test}: two holders with valid leases at once: {violations:?}"
    );
    recovered
}

/// Redis is killed (SIGKILL) and restarted 500 ms later while 4 tasks on 2
/// stores hammer one conversation.
///
/// The restart wipes the data set, tickets included: a holder that was
/// inside when the server died may still be inside when a new holder is
/// granted after the restart. That overlap is inherent, and such a holder
/// learns it (its `release` returns `Expired` or fails), so overlaps are
/// only counted between sections whose release returned `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_load_fails_calls_retryably_and_never_grants_twice() {
    let seed = seed();
    println!("restart: seed {seed}");
    let mut server = RedisServer::start();
    let url = server.url();
    let prefix = unique_prefix("restart");
    let socket_timeout = Duration::from_secs(2);
    let (a, b) = (
        store(&url, &prefix, socket_timeout.as_secs_f64()).await,
        store(&url, &prefix, socket_timeout.as_secs_f64()).await,
    );
    let stores = vec![a.clone(), a, b.clone(), b];
    let probe = probe_connection(&url, socket_timeout).await;
    let monitor = Arc::new(Monitor::default());
    let options = LockOptions::default()
        .with_lifetime(Duration::from_secs(5))
        .with_dead_waiter_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(10));
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(6);
    let tasks = hammer(
        stores,
        probe.clone(),
        prefix.clone(),
        options,
        monitor.clone(),
        stop_at,
        seed,
    );

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = monitor.valid.lock().unwrap().len();
    let down_at = Instant::now();
    tokio::task::block_in_place(|| server.stop());
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| server.restart());
    let up_at = Instant::now();
    monitor.generation.store(1, Ordering::SeqCst);
    println!(
        "restart: {before} sections before the kill; down {} (stop + 500 ms + restart)",
        ms(up_at - down_at)
    );
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(40), task)
            .await
            .expect("a task did not finish")
            .expect("a task panicked");
    }

    check_fault_run(
        "restart",
        &monitor,
        4,
        down_at,
        up_at,
        (
            socket_timeout + Duration::from_millis(2000),
            socket_timeout + Duration::from_millis(2000),
        ),
    );
    // After the restart every section is from a clean slate: no lost update.
    let sets = monitor.sets.lock().unwrap().get(&1).copied().unwrap_or(0);
    let counter: Option<u64> = probe
        .clone()
        .get(format!("{prefix}counter1"))
        .await
        .expect("GET counter");
    assert_eq!(
        counter.unwrap_or(0),
        sets,
        "restart: lost updates after the restart"
    );
    assert!(sets > 0);
}

/// Redis frozen (SIGSTOP) for 3 s with a 1 s socket timeout while 4 tasks
/// hammer one conversation: calls fail with a retryable timeout within the
/// socket timeout + 1 s, and the same stores serve again after SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_under_load_times_out_retryably_and_recovers() {
    let seed = seed();
    println!("freeze: seed {seed}");
    let server = RedisServer::start();
    let url = server.url();
    let prefix = unique_prefix("freeze");
    let socket_timeout = Duration::from_secs(1);
    let (a, b) = (
        store(&url, &prefix, socket_timeout.as_secs_f64()).await,
        store(&url, &prefix, socket_timeout.as_secs_f64()).await,
    );
    let stores = vec![a.clone(), a, b.clone(), b];
    let probe = probe_connection(&url, socket_timeout).await;
    let monitor = Arc::new(Monitor::default());
    // A short lease and dead-waiter timeout: calls that timed out on our
    // side still run once the server thaws (their tickets then have no
    // owner), and these bound how long such tickets hold the queue.
    let options = LockOptions::default()
        .with_lifetime(Duration::from_secs(2))
        .with_dead_waiter_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(10));
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(10);
    let tasks = hammer(
        stores,
        probe,
        prefix,
        options,
        monitor.clone(),
        stop_at,
        seed,
    );

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stopped_at = Instant::now();
    server.sigstop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.sigcont();
    let thawed_at = Instant::now();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(40), task)
            .await
            .expect("a task did not finish")
            .expect("a task panicked");
    }
    {
        let failures = monitor.failures.lock().unwrap();
        let during: Vec<&Failure> = failures
            .iter()
            .filter(|f| f.ended > stopped_at && f.ended <= thawed_at + Duration::from_millis(100))
            .collect();
        assert!(
            !during.is_empty(),
            "nothing failed while the server was frozen"
        );
        for f in &during {
            assert!(
                f.retryable && f.error.contains("timed out"),
                "freeze: task {} {}: expected a retryable timeout, got: {}",
                f.task,
                f.what,
                f.error
            );
        }
    }
    check_fault_run(
        "freeze",
        &monitor,
        4,
        stopped_at,
        thawed_at,
        // Every single call fails within the socket timeout + 1 s; but a
        // `lock_with` whose poll timed out awaits giving its ticket back
        // before it returns (store.rs, `lock_with`'s error path), and on a
        // frozen server that call times out too: ~2 socket timeouts in all
        // (measured 2.2-2.34 s). Tighten this bound to
        // `socket_timeout + 1 s` once the ticket is given back in the
        // background.
        (
            socket_timeout + Duration::from_secs(1),
            2 * socket_timeout + Duration::from_secs(1),
        ),
    );
}

// --- f. a linearizability-style check --------------------------------------------------

/// Four processes, 50 critical sections each, on one conversation. Each
/// logs `grant ...` as the first thing inside its section and `release ...`
/// as the last; the merged log must be a sequence of non-overlapping
/// grant/release pairs of one holder each, in real time (a release's clock
/// reading precedes the next grant's), with fencing tokens increasing and
/// ticket numbers increasing within each epoch (a new epoch, after the
/// queue emptied, starts again at 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_of_four_processes_is_a_sequence_of_disjoint_sections() {
    build_participant_first();
    let url = support::redis_url();
    let prefix = unique_prefix("history");
    let mut conn = raw(&url).await;
    let cid = "conv";
    let log_key = format!("{prefix}log");
    const PROCESSES: usize = 4;
    const SECTIONS: usize = 50;

    let mut participants: Vec<Participant> = (0..PROCESSES)
        .map(|i| {
            Participant::spawn(
                &format!("looper {i}"),
                &url,
                &prefix,
                cid,
                &[
                    "--role",
                    "loop",
                    "--count",
                    &SECTIONS.to_string(),
                    "--hold-ms",
                    "1",
                    "--lifetime-ms",
                    "10000",
                    "--log-key",
                    &log_key,
                    "--max-seconds",
                    "50",
                ],
            )
        })
        .collect();
    for p in &mut participants {
        p.finish(Duration::from_secs(50)).await;
    }

    let log: Vec<String> = conn.lrange(&log_key, 0, -1).await.expect("LRANGE");
    let entries = parse_log(&log);
    assert_eq!(entries.len(), 2 * PROCESSES * SECTIONS, "log: {log:#?}");
    let mut per_pid: HashMap<u32, usize> = HashMap::new();
    let mut epochs = 1;
    let mut previous: Option<(&Entry, &Entry)> = None;
    for (n, pair) in entries.chunks(2).enumerate() {
        let (grant, release) = (&pair[0], &pair[1]);
        let context = || format!("section {n}: {grant:?} / {release:?}\nlog: {log:#?}");
        assert_eq!(grant.kind, "grant", "{}", context());
        assert_eq!(
            release.kind,
            "release",
            "overlapping sections: {}",
            context()
        );
        assert_eq!(
            (grant.ticket, grant.fence, grant.pid),
            (release.ticket, release.fence, release.pid),
            "overlapping sections: {}",
            context()
        );
        assert!(grant.us <= release.us, "{}", context());
        if let Some((_, last_release)) = previous {
            assert!(
                last_release.us <= grant.us,
                "granted before the previous holder released (wall clock): {}",
                context()
            );
            assert!(
                last_release.fence < grant.fence,
                "fencing token not increasing: {}",
                context()
            );
            if grant.ticket == 0 {
                epochs += 1;
            } else {
                assert!(
                    grant.ticket > last_release.ticket,
                    "ticket order broken within an epoch: {}",
                    context()
                );
            }
        }
        *per_pid.entry(grant.pid).or_default() += 1;
        previous = Some((grant, release));
    }
    assert_eq!(per_pid.len(), PROCESSES);
    assert!(per_pid.values().all(|&n| n == SECTIONS), "{per_pid:?}");
    println!(
        "history: {} disjoint sections by {PROCESSES} processes in {epochs} epoch(s)",
        entries.len() / 2
    );
    let _: () = conn.del(&log_key).await.expect("DEL");
    assert!(keys_with_prefix(&mut conn, &prefix).await.is_empty());
}
