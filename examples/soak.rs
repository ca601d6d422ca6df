//! The soak run: worker processes hammer 1,000 conversations for a while
//! through a private Redis, while workers are SIGKILLed (and replaced) and
//! Redis itself is killed and restarted once; then it checks that nothing
//! broke and nothing was left behind.
//!
//! ```sh
//! scripts/soak.sh                          # 300 s, release build
//! cargo run --example soak -- --seconds 30  # what tests/soak.rs runs
//! ```
//!
//! It starts two `redis-server`s on free 127.0.0.1 ports (no persistence,
//! temp dirs, stopped by their pids at the end; a small `sh` watchdog kills
//! them if this process dies first):
//!
//! * the **lock server**, which the locks live in (key prefix `soak`), and
//!   which is killed (SIGKILL) and restarted on the same port once, at
//!   7/12 of the run;
//! * the **probe server**, never restarted (so the restart of the lock
//!   server does not wipe the evidence), where the workers record what
//!   they did, per conversation (the idea of `ticketlock simulate`'s probes):
//!   `log` (`<epoch> <ticket> <fence> <worker>` pushed first thing inside each
//!   critical section), `inside` (who is inside now: an overlap probe),
//!   `counter` (a deliberately non-atomic GET ... SET increment, stamped with
//!   the writer's fence, so a lost update names both writers), `ok` (fences
//!   whose release returned `Ok`) and `lost` (releases that returned `Expired`).
//!
//! `--workers` worker processes (this example, subcommand `worker`) run
//! `--tasks` tasks each; a task picks a conversation (half the time one of
//! 8 hot ones, so queues form), takes the lock, holds it 0-5 ms and releases
//! it. Every ~N/6 s a random worker is SIGKILLed and a new one started.
//!
//! Judged at the end:
//! * **exclusion violations**: two sections of a conversation that were
//!   inside at once (overlap probe or lost update) although *both* releases
//!   returned `Ok`. A worker killed inside its section, and a section in
//!   flight across the Redis restart (which wipes every ticket), lose their
//!   lease: their release does not return `Ok` (or never happens), so they
//!   are excluded. Killing a holder costs its conversation one lease, not a
//!   violation.
//! * **order violations**: among sections whose release returned `Ok`, in
//!   log order: fencing tokens must strictly increase, epochs (the lock
//!   record's creation time) must not go down, and within one epoch ticket
//!   numbers must strictly increase.
//! * **keys left** with the lock prefix once every worker is gone and the
//!   longest lease or dead-waiter timeout + 1 s has passed: must be 0.
//! * the lock server's **`used_memory`** must be back within
//!   `--memory-tolerance-kib` (256) of the baseline measured before the run
//!   (on the first server process; the restart starts a fresh one).
//!
//! Prints a summary (and one JSON line) and exits 0 if all held, 1 if an
//! invariant broke, 2 if the run could not be set up. Everything is bounded:
//! workers stop at the end of the run by themselves; any still running 30 s
//! later are killed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use ticketlock::{LockError, LockOptions, LockStore, StoreConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Parser)]
#[command(about = "Soak: worker processes, SIGKILLs and a Redis restart; then checks invariants")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    worker: Option<Mode>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// One worker process (started by the run, not by hand).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// How long the workers run.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Worker processes at any time.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Concurrent tasks per worker.
    #[arg(long, default_value_t = 4)]
    tasks: usize,
    #[arg(long, default_value_t = 1000)]
    conversations: usize,
    /// The lease, from the grant.
    #[arg(long, default_value_t = 2000)]
    lease_ms: u64,
    #[arg(long, default_value_t = 1000)]
    dead_waiter_ms: u64,
    /// Hold times are uniform in 0..=this.
    #[arg(long, default_value_t = 5)]
    max_hold_ms: u64,
    /// Allowed growth of the lock server's used_memory over the baseline.
    #[arg(long, default_value_t = 256)]
    memory_tolerance_kib: u64,
    /// Seed of every random choice (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
}

#[derive(Debug, Clone, Args)]
struct WorkerArgs {
    #[arg(long)]
    id: u64,
    /// The lock server.
    #[arg(long)]
    redis: String,
    /// The probe server.
    #[arg(long)]
    probe: String,
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    conversations: usize,
    #[arg(long)]
    tasks: usize,
    #[arg(long)]
    lease_ms: u64,
    #[arg(long)]
    dead_waiter_ms: u64,
    #[arg(long)]
    max_hold_ms: u64,
    #[arg(long)]
    seed: u64,
    /// Stop starting sections at this wall-clock time (Unix ms).
    #[arg(long)]
    until_unix_ms: u64,
}

/// Lock key prefix (keys `soak:lock:...`).
const PREFIX: &str = "soak";
/// Conversations that get half of all picks, so queues form.
const HOT: usize = 8;
/// Bound on every Redis call of the workers and of the run.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.worker {
        Some(Mode::Worker(args)) => match runtime.block_on(worker(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("soak worker: {e}");
                ExitCode::from(2)
            }
        },
        None => match runtime.block_on(run(cli.run)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("soak: could not run: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn unix_ms() -> u64 {
    unix_us() / 1000
}

fn cid(n: usize) -> String {
    format!("c{n}")
}

/// `soak:{c<n>}:<name>` on the probe server.
fn probe_key(n: usize, name: &str) -> String {
    format!("soak:{{c{n}}}:{name}")
}

async fn connection(url: &str) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(SOCKET_TIMEOUT))
        .set_response_timeout(Some(SOCKET_TIMEOUT))
        .set_number_of_retries(2);
    redis::Client::open(url)?
        .get_connection_manager_with_config(config)
        .await
}

// --- the worker ---------------------------------------------------------------------

/// Inside the section, first thing: drop overlap-probe entries whose lease
/// ended over a second ago (their holders can no longer be inside
/// legitimately), note an overlap with everyone still inside, step inside,
/// log the grant, and read the counter.
/// KEYS: inside, log, overlaps, counter. ARGV: fence, entry, deadline ms, now ms.
const ENTER: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (tonumber(ARGV[4]) - 1000))
for _, other in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('RPUSH', KEYS[3], ARGV[1] .. ' ' .. other)
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
return redis.call('GET', KEYS[4]) or '0 0'
";

/// Last thing inside: write the counter back (noting a lost update, with
/// the writer that came in between) and step outside.
/// KEYS: inside, overlaps, counter. ARGV: fence, value read, value to write.
const LEAVE: &str = r"
local now = redis.call('GET', KEYS[3]) or '0 0'
if now ~= ARGV[2] then
  local writer = string.match(now, ' (%d+)$') or '?'
  redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. writer)
end
redis.call('SET', KEYS[3], ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
";

#[derive(Default)]
struct Tally {
    sections: AtomicU64,
    ok: AtomicU64,
    lost: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, kind: impl Into<String>) {
        *self.errors.lock().unwrap().entry(kind.into()).or_default() += 1;
    }
}

fn error_kind(e: &LockError) -> String {
    match e {
        LockError::Expired { .. } => "expired".into(),
        LockError::Timeout { .. } => "timeout".into(),
        LockError::Backend {
            retryable: true, ..
        } => "backend (retryable)".into(),
        other => format!("other: {other}"),
    }
}

async fn worker(args: WorkerArgs) -> Result<(), Failure> {
    let mut config = StoreConfig::redis(args.redis.as_str());
    config.key_prefix = Some(args.prefix.clone());
    config.socket_timeout = Some(SOCKET_TIMEOUT.as_secs_f64());
    let store = LockStore::create(Some(&config)).await?;
    let probe = connection(&args.probe).await?;
    let tally = Arc::new(Tally::default());
    let args = Arc::new(args);
    let tasks: Vec<_> = (0..args.tasks)
        .map(|task| {
            let (store, probe, tally, args) =
                (store.clone(), probe.clone(), tally.clone(), args.clone());
            tokio::spawn(async move { work(task, store, probe, tally, args).await })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    let errors = tally.errors.lock().unwrap().clone();
    println!(
        "{}",
        serde_json::json!({
            "worker": args.id,
            "sections": tally.sections.load(Ordering::SeqCst),
            "ok": tally.ok.load(Ordering::SeqCst),
            "lost": tally.lost.load(Ordering::SeqCst),
            "errors": errors,
        })
    );
    Ok(())
}

async fn work(
    task: usize,
    store: LockStore,
    mut probe: ConnectionManager,
    tally: Arc<Tally>,
    args: Arc<WorkerArgs>,
) {
    let (enter, leave) = (redis::Script::new(ENTER), redis::Script::new(LEAVE));
    let mut rng = StdRng::seed_from_u64(
        args.seed ^ (args.id << 32) ^ (task as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let options = LockOptions::default()
        .with_lifetime(Duration::from_millis(args.lease_ms))
        .with_dead_waiter_timeout(Duration::from_millis(args.dead_waiter_ms))
        .with_timeout(Duration::from_secs(10));
    let hot = HOT.min(args.conversations);
    for _ in 0..100_000_000_u64 {
        if unix_ms() >= args.until_unix_ms {
            break;
        }
        let n = if rng.random_bool(0.5) {
            rng.random_range(0..hot)
        } else {
            rng.random_range(0..args.conversations)
        };
        let cid = cid(n);
        let guard = match store.lock_with(&cid, options).await {
            Ok(guard) => guard,
            Err(e) => {
                tally.error(format!("lock: {}", error_kind(&e)));
                tokio::time::sleep(Duration::from_millis(rng.random_range(10..50))).await;
                continue;
            }
        };
        tally.sections.fetch_add(1, Ordering::SeqCst);
        let (ticket, fence) = (guard.ticket(), guard.fencing_token());
        // The record's epoch cannot change while we hold a live ticket in it
        // (only a delete or a lost data set could, and then we lost the lease).
        // The first call after a restart of the lock server may fail (the
        // connection manager reconnects then): one more try.
        let mut inspected = store.inspect(&cid).await;
        if inspected.is_err() {
            inspected = store.inspect(&cid).await;
        }
        // No epoch: the record is gone (our lease with it) or unreadable;
        // either way this section is not vouched for.
        let epoch = inspected.ok().and_then(|i| i.record).map(|r| r.epoch);
        let entry = format!("{} {ticket} {fence} {}", epoch.unwrap_or(0), args.id);
        let now = unix_ms();
        let entered: redis::RedisResult<String> = enter
            .key(probe_key(n, "inside"))
            .key(probe_key(n, "log"))
            .key(probe_key(n, "overlaps"))
            .key(probe_key(n, "counter"))
            .arg(fence)
            .arg(entry)
            .arg(now + args.lease_ms)
            .arg(now)
            .invoke_async(&mut probe)
            .await;
        let mut probes_ok = entered.is_ok() && epoch.is_some();
        if let Ok(read) = &entered {
            let value: u64 = read
                .split(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let hold = rng.random_range(0..=args.max_hold_ms);
            if hold > 0 {
                tokio::time::sleep(Duration::from_millis(hold)).await;
            }
            let left: redis::RedisResult<i64> = leave
                .key(probe_key(n, "inside"))
                .key(probe_key(n, "overlaps"))
                .key(probe_key(n, "counter"))
                .arg(fence)
                .arg(read.as_str())
                .arg(format!("{} {fence}", value + 1))
                .invoke_async(&mut probe)
                .await;
            probes_ok &= left.is_ok();
        }
        if !probes_ok {
            tally.error("probe");
        }
        match guard.release().await {
            // A section whose probes failed is not vouched for.
            Ok(()) if probes_ok => {
                tally.ok.fetch_add(1, Ordering::SeqCst);
                let recorded: redis::RedisResult<i64> = probe.sadd(probe_key(n, "ok"), fence).await;
                if recorded.is_err() {
                    tally.error("probe");
                }
            }
            Ok(()) => {}
            Err(LockError::Expired { .. }) => {
                tally.lost.fetch_add(1, Ordering::SeqCst);
                let _: redis::RedisResult<i64> = probe.sadd(probe_key(n, "lost"), fence).await;
            }
            Err(e) => tally.error(format!("release: {}", error_kind(&e))),
        }
    }
}

// --- private redis-servers ------------------------------------------------------------

/// A `redis-server` on a 127.0.0.1 port, stopped by its pid.
struct RedisProcess {
    binary: PathBuf,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl RedisProcess {
    async fn start(binary: &Path, dir: PathBuf) -> Result<RedisProcess, Failure> {
        std::fs::create_dir_all(&dir)?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
                .local_addr()?
                .port();
            let mut server = RedisProcess {
                binary: binary.to_owned(),
                port,
                dir: dir.clone(),
                child: None,
                watchdog: None,
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("could not start {}: {last}", binary.display()).into())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) -> Result<(), Failure> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))?;
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.binary.display()))?;
        let pid = child.id().ok_or("redis-server exited at once")?;
        // Kills the server (by pid) if this process dies without stopping it.
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                r#"while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
                   case "$(cat "/proc/$2/comm" 2>/dev/null)" in redis*) kill -s KILL "$2" ;; esac"#,
            )
            .arg("soak-redis-watchdog")
            .arg(std::process::id().to_string())
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        self.watchdog = Some(watchdog);
        // Ready, and ours (not some other server that held the port).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.stop().await;
                return Err(format!("redis-server exited early ({status})").into());
            }
            if let Ok(info) = info(&self.url(), "server").await {
                if field(&info, "process_id") == Some(u64::from(pid)) {
                    return Ok(());
                }
                self.stop().await;
                return Err(format!("port {} is taken by another server", self.port).into());
            }
            if Instant::now() >= deadline {
                self.stop().await;
                return Err("redis-server did not answer within 5 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL (no graceful shutdown), by pid.
    async fn stop(&mut self) {
        for mut child in [self.child.take(), self.watchdog.take()]
            .into_iter()
            .flatten()
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Kill, wait 500 ms, start a fresh (empty) server on the same port.
    async fn restart(&mut self) -> Result<(), Failure> {
        self.stop().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

async fn info(url: &str, section: &str) -> redis::RedisResult<String> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("INFO").arg(section).query_async(&mut conn).await
}

fn field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs `call` up to 5 times: the first command on a connection whose
/// server was restarted fails (the connection manager reconnects then).
async fn retried<T, F, Fut>(conn: &mut ConnectionManager, mut call: F) -> Result<T, Failure>
where
    F: FnMut(ConnectionManager) -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let mut attempt = 0;
    loop {
        match call(conn.clone()).await {
            Ok(value) => return Ok(value),
            Err(e) if attempt >= 4 => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn used_memory(mut conn: ConnectionManager) -> Result<u64, Failure> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await?;
    field(&info, "used_memory").ok_or_else(|| "INFO memory has no used_memory".into())
}

async fn scan_count(mut conn: ConnectionManager, pattern: String) -> Result<usize, Failure> {
    let conn = &mut conn;
    let pattern = pattern.as_str();
    let mut cursor = 0_u64;
    let mut count = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        count += keys.len();
        if next == 0 {
            return Ok(count);
        }
        cursor = next;
    }
}

// --- the run -------------------------------------------------------------------------

/// A worker process and what it printed.
struct Worker {
    id: u64,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

fn spawn_worker(
    args: &RunArgs,
    id: u64,
    lock_url: &str,
    probe_url: &str,
    seed: u64,
    until_unix_ms: u64,
) -> Result<Worker, Failure> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("worker")
        .args([
            "--id",
            &id.to_string(),
            "--redis",
            lock_url,
            "--probe",
            probe_url,
        ])
        .args(["--prefix", PREFIX])
        .args(["--conversations", &args.conversations.to_string()])
        .args(["--tasks", &args.tasks.to_string()])
        .args(["--lease-ms", &args.lease_ms.to_string()])
        .args(["--dead-waiter-ms", &args.dead_waiter_ms.to_string()])
        .args(["--max-hold-ms", &args.max_hold_ms.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--until-unix-ms", &until_unix_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let output = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take().ok_or("worker stdout")?;
    let sink = output.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    Ok(Worker { id, child, output })
}

#[derive(Debug, Default)]
struct Verdict {
    sections: u64,
    ok: u64,
    lost: u64,
    overlaps_seen: u64,
    exclusion_violations: u64,
    order_violations: u64,
    examples: Vec<String>,
}

/// Reads every conversation's probes and judges them (see the module docs).
async fn judge(probe: &mut ConnectionManager, conversations: usize) -> Result<Verdict, Failure> {
    let mut verdict = Verdict::default();
    let all: Vec<usize> = (0..conversations).collect();
    for chunk in all.chunks(200) {
        let mut pipe = redis::pipe();
        for &n in chunk {
            pipe.lrange(probe_key(n, "log"), 0, -1)
                .smembers(probe_key(n, "ok"))
                .scard(probe_key(n, "lost"))
                .lrange(probe_key(n, "overlaps"), 0, -1);
        }
        type Probes = (Vec<String>, HashSet<u64>, u64, Vec<String>);
        let replies: Vec<Probes> = pipe.query_async(probe).await?;
        for (&n, (log, ok, lost, overlaps)) in chunk.iter().zip(replies) {
            verdict.sections += log.len() as u64;
            verdict.ok += ok.len() as u64;
            verdict.lost += lost;
            verdict.overlaps_seen += overlaps.len() as u64;
            for pair in &overlaps {
                let mut fences = pair.split(' ').map(|f| f.parse::<u64>().ok());
                if let (Some(Some(a)), Some(Some(b))) = (fences.next(), fences.next()) {
                    if ok.contains(&a) && ok.contains(&b) {
                        verdict.exclusion_violations += 1;
                        if verdict.examples.len() < 10 {
                            verdict.examples.push(format!(
                                "{}: fences {a} and {b} were inside at once",
                                cid(n)
                            ));
                        }
                    }
                }
            }
            let mut previous: Option<(u64, u64, u64)> = None;
            for line in &log {
                let f: Vec<u64> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
                let [epoch, ticket, fence, _worker] = f[..] else {
                    return Err(format!("{}: malformed log entry {line:?}", cid(n)).into());
                };
                if !ok.contains(&fence) {
                    continue;
                }
                if let Some((e0, t0, f0)) = previous {
                    let broken = fence <= f0 || epoch < e0 || (epoch == e0 && ticket <= t0);
                    if broken {
                        verdict.order_violations += 1;
                        if verdict.examples.len() < 10 {
                            verdict.examples.push(format!(
                                "{}: (epoch {e0}, ticket {t0}, fence {f0}) then (epoch {epoch}, ticket {ticket}, fence {fence})",
                                cid(n)
                            ));
                        }
                    }
                }
                previous = Some((epoch, ticket, fence));
            }
        }
    }
    Ok(verdict)
}

async fn run(args: RunArgs) -> Result<bool, Failure> {
    let seed = args
        .seed
        .unwrap_or_else(|| unix_us() ^ u64::from(std::process::id()));
    let mut rng = StdRng::seed_from_u64(seed);
    let n = args.seconds.max(1);
    println!(
        "soak: {} s, {} workers x {} tasks, {} conversations, lease {} ms, dead-waiter timeout {} ms, hold 0-{} ms, seed {seed}",
        n, args.workers, args.tasks, args.conversations, args.lease_ms, args.dead_waiter_ms, args.max_hold_ms
    );
    let dir = std::env::temp_dir().join(format!(
        "ticketlock-soak-{}-{}",
        std::process::id(),
        unix_us()
    ));
    let mut lock_server = RedisProcess::start(&args.redis_server, dir.join("locks")).await?;
    let mut probe_server = RedisProcess::start(&args.redis_server, dir.join("probes")).await?;
    let outcome = drive(&args, seed, &mut rng, &mut lock_server, &probe_server).await;
    lock_server.stop().await;
    probe_server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

async fn drive(
    args: &RunArgs,
    seed: u64,
    rng: &mut StdRng,
    lock_server: &mut RedisProcess,
    probe_server: &RedisProcess,
) -> Result<bool, Failure> {
    let (lock_url, probe_url) = (lock_server.url(), probe_server.url());
    let mut config = StoreConfig::redis(lock_url.as_str());
    config.key_prefix = Some(PREFIX.into());
    config.socket_timeout = Some(SOCKET_TIMEOUT.as_secs_f64());
    let store = LockStore::create(Some(&config)).await?;
    let mut locks = connection(&lock_url).await?;
    let mut probe = connection(&probe_url).await?;
    // Baseline: the library loaded, our own connections open, no lock data.
    store.lock("warm-up").await?.release().await?;
    let baseline = retried(&mut locks, used_memory).await?;

    let n = args.seconds.max(1);
    let started = Instant::now();
    let until_unix_ms = unix_ms() + n * 1000;
    let end = started + Duration::from_secs(n);
    let mut next_id = 0;
    let mut workers = Vec::new();
    for _ in 0..args.workers {
        workers.push(spawn_worker(
            args,
            next_id,
            &lock_url,
            &probe_url,
            seed,
            until_unix_ms,
        )?);
        next_id += 1;
    }
    // Kills at k*N/6 (k = 1..5); the restart between the 3rd and the 4th.
    #[derive(Debug)]
    enum Event {
        Kill,
        Restart,
    }
    let mut events: Vec<(Duration, Event)> = (1..6)
        .map(|k| (Duration::from_secs(n) * k / 6, Event::Kill))
        .collect();
    events.push((Duration::from_secs(n) * 7 / 12, Event::Restart));
    events.sort_by_key(|(at, _)| *at);
    let mut kills = 0;
    let mut restart_took = None;
    let mut broken: Vec<String> = Vec::new();
    for (at, event) in events {
        tokio::time::sleep_until(started + at).await;
        match event {
            Event::Kill if !workers.is_empty() => {
                let i = rng.random_range(0..workers.len());
                let mut victim = workers.swap_remove(i);
                victim.child.start_kill()?;
                let _ = victim.child.wait().await;
                kills += 1;
                println!(
                    "soak: {:>5.1} s: SIGKILL worker {} (pid gone), starting worker {next_id}",
                    started.elapsed().as_secs_f64(),
                    victim.id
                );
                workers.push(spawn_worker(
                    args,
                    next_id,
                    &lock_url,
                    &probe_url,
                    seed,
                    until_unix_ms,
                )?);
                next_id += 1;
            }
            Event::Kill => {}
            Event::Restart => {
                let t = Instant::now();
                lock_server.restart().await?;
                restart_took = Some(t.elapsed());
                println!(
                    "soak: {:>5.1} s: lock server killed and restarted (down {:.0} ms)",
                    started.elapsed().as_secs_f64(),
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
        }
        // A worker that ended on its own before the end is a failure.
        for w in &mut workers {
            if let Ok(Some(status)) = w.child.try_wait() {
                broken.push(format!("worker {} exited early ({status})", w.id));
            }
        }
    }
    tokio::time::sleep_until(end).await;

    // Workers stop by themselves; 30 s later the rest are killed.
    let mut summaries = Vec::new();
    for mut w in workers {
        match tokio::time::timeout_at(end + Duration::from_secs(30), w.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(status) => broken.push(format!("worker {} ended with {status:?}", w.id)),
            Err(_) => {
                let _ = w.child.start_kill();
                let _ = w.child.wait().await;
                broken.push(format!("worker {} did not stop in time (killed)", w.id));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        summaries.extend(w.output.lock().unwrap().iter().cloned());
    }
    let all_stopped = Instant::now();
    let mut worker_errors: BTreeMap<String, u64> = BTreeMap::new();
    for line in &summaries {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(errors) = v["errors"].as_object() {
                for (kind, count) in errors {
                    *worker_errors.entry(kind.clone()).or_default() += count.as_u64().unwrap_or(0);
                }
            }
        }
    }
    let pattern = format!("{PREFIX}:lock:*");
    let keys_at_stop = retried(&mut locks, |c| scan_count(c, pattern.clone())).await?;
    // Every key expires at most 1 s after its last ticket; a ticket lives at
    // most the lease (held) or the dead-waiter timeout (waiting). A request
    // cancelled after an outage (its issue's answer lost) is remembered for
    // three socket timeouts.
    let settle = Duration::from_millis(args.lease_ms.max(args.dead_waiter_ms) + 1000 + 500)
        .max(SOCKET_TIMEOUT * 3 + Duration::from_millis(1500));
    tokio::time::sleep_until(all_stopped + settle).await;
    let keys_left = retried(&mut locks, |c| scan_count(c, pattern.clone())).await?;
    // The same connections as at the baseline (the store's reconnects on use).
    for _ in 0..5 {
        if store.get_lock("warm-up").await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let end_memory = retried(&mut locks, used_memory).await?;
    let verdict = judge(&mut probe, args.conversations).await?;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut probe).await?;

    let growth = end_memory as i64 - baseline as i64;
    let tolerance = args.memory_tolerance_kib * 1024;
    let memory_ok = growth <= tolerance as i64;
    let ok = verdict.exclusion_violations == 0
        && verdict.order_violations == 0
        && keys_left == 0
        && memory_ok
        && verdict.ok > 0
        && broken.is_empty();
    println!(
        "soak: workers killed: {kills}, lock server restarts: {} (down {} ms)",
        u8::from(restart_took.is_some()),
        restart_took.map_or(0, |d| d.as_millis())
    );
    println!("soak: worker errors (retried): {worker_errors:?}");
    for line in &broken {
        println!("soak: BROKEN: {line}");
    }
    for example in &verdict.examples {
        println!("soak: violation: {example}");
    }
    println!(
        "soak: sections run: {} (released in time {}, lease lost {}, unaccounted {})",
        verdict.sections,
        verdict.ok,
        verdict.lost,
        verdict.sections.saturating_sub(verdict.ok + verdict.lost)
    );
    println!(
        "soak: overlaps seen: {} (expected with a holder that was killed or lost its lease; the violations are those between two sections released in time)",
        verdict.overlaps_seen
    );
    println!(
        "soak: exclusion violations: {}",
        verdict.exclusion_violations
    );
    println!("soak: order violations: {}", verdict.order_violations);
    println!("soak: keys left with the prefix: {keys_left} ({keys_at_stop} when the last worker stopped)");
    println!(
        "soak: used_memory: baseline {baseline} B, end {end_memory} B, growth {growth} B (tolerance {tolerance} B)"
    );
    println!(
        "{}",
        serde_json::json!({
            "seconds": n,
            "seed": seed,
            "sections": verdict.sections,
            "released_in_time": verdict.ok,
            "lease_lost": verdict.lost,
            "overlaps_seen": verdict.overlaps_seen,
            "exclusion_violations": verdict.exclusion_violations,
            "order_violations": verdict.order_violations,
            "keys_left": keys_left,
            "used_memory_baseline": baseline,
            "used_memory_end": end_memory,
            "used_memory_growth": growth,
            "workers_killed": kills,
            "worker_errors": worker_errors,
            "ok": ok,
        })
    );
    println!("soak: result: {}", if ok { "ok" } else { "FAILED" });
    Ok(ok)
}
