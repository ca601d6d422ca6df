//! A Rust contender for the cross-language tests (tests/cross_language.rs),
//! the twin of `python -m ticketlock contend` (the Python package in `python/`).
//!
//! ```sh
//! cargo run --example contend -- --redis redis://127.0.0.1:6379 --prefix P \
//!     --conversation C --count 100 --counter-key K --log-key L [--tasks 2]
//! ```
//!
//! Each of `--tasks` tasks (each with a store and connection of its own)
//! performs `--count` critical sections: a deliberately non-atomic `GET K` /
//! `SET K+1`, and `RPUSH L "<ticket> rs <pid> <epoch> <fence>"`. A lost update
//! on K means two holders overlapped; the log shows the order of the grants.
//! At the end one line of JSON goes to stdout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use ticketlock::{LockOptions, LockStore, StoreConfig};

#[derive(Debug, Parser)]
struct Args {
    /// redis://host:port[/db]
    #[arg(long)]
    redis: String,
    /// Alphanumeric key prefix P (keys P:lock:...).
    #[arg(long)]
    prefix: Option<String>,
    #[arg(long)]
    conversation: String,
    /// Critical sections per task.
    #[arg(long)]
    count: u64,
    #[arg(long)]
    counter_key: String,
    #[arg(long)]
    log_key: String,
    /// Sleep this long between the GET and the SET.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// Concurrent tasks in this process.
    #[arg(long, default_value_t = 1)]
    tasks: u64,
    /// The lease, from the grant.
    #[arg(long, default_value_t = 30.0)]
    lifetime_s: f64,
    #[arg(long, default_value_t = 1.0)]
    wait_time_s: f64,
    /// A waiting ticket lapses this long after its waiter's last check-in.
    #[arg(long, default_value_t = 5.0)]
    dead_waiter_timeout_s: f64,
    /// Print {"event":"ready"} and start at a line on stdin.
    #[arg(long)]
    ready_go: bool,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let args = Arc::new(Args::parse());
    let pid = std::process::id();
    let mut clients = Vec::new();
    for _ in 0..args.tasks {
        let mut config = StoreConfig::redis(args.redis.as_str());
        config.key_prefix = args.prefix.clone();
        let store = LockStore::create(Some(&config)).await?;
        let conn = redis::Client::open(args.redis.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        clients.push((store, conn));
    }
    if args.ready_go {
        println!("{{\"event\":\"ready\",\"lang\":\"rs\",\"pid\":{pid}}}");
        tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await??;
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(store, conn)| tokio::spawn(contend(store, conn, args.clone(), pid)))
        .collect();
    let mut waits = Vec::new();
    for task in tasks {
        waits.extend(task.await??);
    }
    let max = waits.iter().max().copied().unwrap_or_default();
    let mean = waits.iter().sum::<Duration>() / u32::try_from(waits.len().max(1))?;
    println!(
        "{}",
        serde_json::json!({
            "lang": "rs",
            "pid": pid,
            "tasks": args.tasks,
            "count": waits.len(),
            "elapsed_ms": started.elapsed().as_secs_f64() * 1e3,
            "wait_ms_mean": mean.as_secs_f64() * 1e3,
            "wait_ms_max": max.as_secs_f64() * 1e3,
        })
    );
    Ok(())
}

/// `args.count` critical sections; returns how long each waited for the lock.
async fn contend(
    store: LockStore,
    mut conn: MultiplexedConnection,
    args: Arc<Args>,
    pid: u32,
) -> Result<Vec<Duration>, Failure> {
    let options = LockOptions::default()
        .with_lifetime(Duration::from_secs_f64(args.lifetime_s))
        .with_wait_time(Duration::from_secs_f64(args.wait_time_s))
        .with_dead_waiter_timeout(Duration::from_secs_f64(args.dead_waiter_timeout_s));
    let mut waits = Vec::with_capacity(usize::try_from(args.count)?);
    for _ in 0..args.count {
        let asked = Instant::now();
        let guard = store.lock_with(&args.conversation, options).await?;
        waits.push(asked.elapsed());
        // The record cannot go while we hold a live ticket in it.
        let epoch = store
            .inspect(&args.conversation)
            .await?
            .record
            .map_or(0, |r| r.epoch);
        let value: Option<u64> = conn.get(&args.counter_key).await?;
        if args.hold_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.hold_ms)).await;
        }
        let () = conn.set(&args.counter_key, value.unwrap_or(0) + 1).await?;
        let entry = format!(
            "{} rs {pid} {epoch} {}",
            guard.ticket(),
            guard.fencing_token()
        );
        let _: u64 = conn.rpush(&args.log_key, entry).await?;
        guard.release().await?;
    }
    Ok(waits)
}
