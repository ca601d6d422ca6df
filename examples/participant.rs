//! One participant in a lock, as a separate OS process, for the fault
//! tests (tests/faults.rs): a test starts it, reads what it does from stdout
//! and SIGKILLs it at a chosen moment (while waiting, inside its critical
//! section, ...).
//!
//! ```sh
//! cargo run --example participant -- --redis redis://127.0.0.1:6379 --prefix P \
//!     --conversation C [--conversation C2 ...] --role hold|wait|loop \
//!     [--lifetime-ms N] [--dead-waiter-ms N] [--count N] [--hold-ms N] \
//!     [--log-key K] [--counter-key K] [--check-held]
//! ```
//!
//! Roles: `hold` takes the lock once and keeps it for `--hold-ms` (default:
//! until killed, at most `--max-seconds`); `wait` takes it once and keeps it
//! `--hold-ms` (default 0); `loop` runs `--count` critical sections.
//!
//! `--redis` may also be a cluster URL, `redis+cluster://h1:p1,h2:p2` (with
//! `[user:password@]`): the store and the participant's own log/counter
//! connection then speak Redis Cluster. (`rediss+cluster://` gives that
//! connection `rediss://` nodes with the system's roots only: no custom CA,
//! no `#insecure`.)
//!
//! `--conversation` may be given several times: the role then runs for each
//! conversation at once (one task each, `--count` sections each), every
//! line below except `ready`, `issued` and `done` ends with the
//! conversation, and `done` counts the sections of all of them. In
//! `--log-key` and `--counter-key`, `<cid>` stands for the conversation (so
//! `P:log:{<cid>}` puts each conversation's list on its lock's shard).
//!
//! Every line on stdout is flushed as it is written (`<word> <args...>`):
//!
//! | line | when |
//! | --- | --- |
//! | `ready <pid>` | connected |
//! | `waiting` | about to ask for the lock |
//! | `issued <ticket>` | the store handed out a ticket (from the library's debug event) |
//! | `acquired <ticket> <fence>` | the lock is granted |
//! | `late <ticket> <fence>` | `--check-held`: the lease was gone right after the log entry was written, so that entry may be out of order |
//! | `released <ticket>` | released in time |
//! | `expired <ticket>` | the release found the lease gone |
//! | `error <retryable> <message>` | a call failed (retried while time is left) |
//! | `done <sections>` | finished |
//!
//! With `--log-key K`, each critical section RPUSHes
//! `grant <ticket> <fence> <pid> <wall-clock µs>` to list K as its first
//! action and `release <ticket> <fence> <pid> <wall-clock µs>` as its last
//! one before releasing; with `--check-held` also `late ...` (as above) after
//! the grant entry when the lease turned out to be gone.
//!
//! With `--counter-key K`, each critical section does a deliberately
//! non-atomic read-modify-write of the integer at K: GET (missing is 0) right
//! after the grant entry, then the hold, then SET to the value read plus one
//! (before the release entry). Only the lock keeps updates from being lost.
//!
//! Bounded: at most `--count` sections, `--count * 10 + 10` attempts and
//! `--max-seconds` (default 60) in all; then it exits.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, RedisResult};
use ticketlock::{LockError, LockGuard, LockOptions, LockStore, StoreConfig};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Hold,
    Wait,
    Loop,
}

#[derive(Debug, Parser)]
#[command(about = "A lock participant as its own process (for tests/faults.rs)")]
struct Args {
    /// redis://127.0.0.1:PORT[/db], or redis+cluster://h1:p1,h2:p2
    #[arg(long)]
    redis: String,
    /// Alphanumeric key prefix (keys `<prefix>:lock:...`).
    #[arg(long)]
    prefix: String,
    /// Repeatable: the role runs for each conversation at once.
    #[arg(long, required = true)]
    conversation: Vec<String>,
    #[arg(long, value_enum)]
    role: Role,
    /// The lease, from the grant.
    #[arg(long, default_value_t = 30_000)]
    lifetime_ms: u64,
    /// A waiting ticket lives this long after its waiter's last check-in.
    #[arg(long)]
    dead_waiter_ms: Option<u64>,
    /// Critical sections (role loop).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Time inside each critical section (hold: default until killed).
    #[arg(long)]
    hold_ms: Option<u64>,
    /// RPUSH grant/release lines to this list (`<cid>`: the conversation).
    #[arg(long)]
    log_key: Option<String>,
    /// GET, then SET + 1, this integer in each section (`<cid>` as above).
    #[arg(long)]
    counter_key: Option<String>,
    /// After the grant entry, ask the store whether the lease still stands.
    #[arg(long)]
    check_held: bool,
    /// Bound on every Redis call.
    #[arg(long, default_value_t = 5_000)]
    socket_timeout_ms: u64,
    /// Longest pause between two checks of the queue.
    #[arg(long)]
    wait_time_ms: Option<u64>,
    /// Exit after this long whatever happens.
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Prints one line and flushes it, so a test reading the pipe sees it at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// Turns the library's `ticket issued` debug event into an `issued <n>` line.
struct IssuedLine;

#[derive(Default)]
struct IssuedFields {
    message: Option<String>,
    ticket: Option<u64>,
}

impl tracing::field::Visit for IssuedFields {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "ticket" {
            self.ticket = Some(value);
        }
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        if field.name() == "ticket" {
            self.ticket = u64::try_from(value).ok();
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = Some(format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for IssuedLine {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = IssuedFields::default();
        event.record(&mut fields);
        if let (Some("ticket issued"), Some(ticket)) = (fields.message.as_deref(), fields.ticket) {
            say(&format!("issued {ticket}"));
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    // Leaked: one per process, shared by the tasks of every conversation.
    let args: &'static Args = Box::leak(Box::new(Args::parse()));
    let filter =
        tracing_subscriber::filter::Targets::new().with_target("ticketlock", tracing::Level::DEBUG);
    tracing_subscriber::registry()
        .with(IssuedLine.with_filter(filter))
        .init();

    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    match tokio::time::timeout_at(deadline.into(), run(args, deadline)).await {
        Ok(result) => result,
        Err(_) => {
            say("error false max-seconds reached");
            std::process::exit(3);
        }
    }
}

/// The participant's own connection, for its log and counter: plain, or a
/// cluster connection (which routes each key to its shard).
#[derive(Clone)]
enum Conn {
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn open(url: &str, timeout: Duration) -> Result<Conn, Failure> {
        match cluster_nodes(url) {
            Some(nodes) => {
                let client = ClusterClientBuilder::new(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
            None => {
                let conn = redis::Client::open(url)?
                    .get_multiplexed_async_connection_with_config(
                        &AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(timeout))
                            .set_response_timeout(Some(timeout)),
                    )
                    .await?;
                Ok(Conn::Plain(conn))
            }
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self.clone() {
            Conn::Plain(mut conn) => cmd.query_async(&mut conn).await,
            Conn::Cluster(mut conn) => cmd.query_async(&mut conn).await,
        }
    }
}

/// The node URLs of `redis+cluster://[auth@]h1:p1,h2:p2` (`rediss+cluster`:
/// `rediss://` nodes), each with the credentials; `None` for other URLs.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = url.split_once("://")?;
    let base = scheme.strip_suffix("+cluster")?;
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.split(['/', '#']).next().unwrap_or_default();
    Some(
        hosts
            .split(',')
            .map(|host| format!("{base}://{auth}{host}"))
            .collect(),
    )
}

async fn run(args: &'static Args, deadline: Instant) -> Result<(), Failure> {
    let timeout = Duration::from_millis(args.socket_timeout_ms);
    let mut config = StoreConfig::redis(args.redis.as_str());
    config.key_prefix = Some(args.prefix.clone());
    config.socket_timeout = Some(timeout.as_secs_f64());
    let store = LockStore::create(Some(&config)).await?;
    let conn = Conn::open(&args.redis, timeout).await?;
    say(&format!("ready {}", std::process::id()));

    let mut options = LockOptions::default().with_lifetime(Duration::from_millis(args.lifetime_ms));
    if let Some(ms) = args.dead_waiter_ms {
        options = options.with_dead_waiter_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = args.wait_time_ms {
        options = options.with_wait_time(Duration::from_millis(ms));
    }
    let (count, hold) = match args.role {
        Role::Hold => (1, args.hold_ms.map(Duration::from_millis)),
        Role::Wait => (1, Some(Duration::from_millis(args.hold_ms.unwrap_or(0)))),
        Role::Loop => (
            args.count,
            Some(Duration::from_millis(args.hold_ms.unwrap_or(0))),
        ),
    };

    let several = args.conversation.len() > 1;
    let tasks: Vec<_> = args
        .conversation
        .iter()
        .map(|cid| {
            let party = Party {
                args,
                cid,
                // Appended to the lines only with several conversations, so
                // a single one prints exactly what it always did.
                tag: if several {
                    format!(" {cid}")
                } else {
                    String::new()
                },
                store: store.clone(),
                conn: conn.clone(),
            };
            tokio::spawn(party.sections(options, count, hold, deadline))
        })
        .collect();
    let mut done = 0;
    for task in tasks {
        done += task.await?;
    }
    say(&format!("done {done}"));
    Ok(())
}

fn report(e: &LockError, tag: &str) {
    let message = e.to_string().replace('\n', " ");
    say(&format!("error {} {message}{tag}", e.is_retryable()));
}

/// The role's work on one conversation.
struct Party {
    args: &'static Args,
    cid: &'static str,
    /// `""`, or `" <cid>"` with several conversations.
    tag: String,
    store: LockStore,
    conn: Conn,
}

impl Party {
    /// A key of `--log-key`/`--counter-key` for this conversation.
    fn key(&self, template: &str) -> String {
        template.replace("<cid>", self.cid)
    }

    /// `count` critical sections; returns how many were done.
    async fn sections(
        self,
        options: LockOptions,
        count: u64,
        hold: Option<Duration>,
        deadline: Instant,
    ) -> u64 {
        let tag = &self.tag;
        let mut done = 0;
        let mut attempts = 0;
        while done < count {
            attempts += 1;
            if attempts > count * 10 + 10 || Instant::now() >= deadline {
                say(&format!(
                    "error false gave up after {attempts} attempts{tag}"
                ));
                say(&format!("done {done}"));
                std::process::exit(4);
            }
            say(&format!("waiting{tag}"));
            let guard = match self.store.lock_with(self.cid, options).await {
                Ok(guard) => guard,
                Err(e) => {
                    report(&e, tag);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            self.section(guard, hold, deadline).await;
            done += 1;
        }
        done
    }

    /// Appends `<kind> <ticket> <fence> <pid> <µs>` to the log, if any.
    async fn log(&self, kind: &str, ticket: u64, fence: u64) {
        if let Some(key) = &self.args.log_key {
            let entry = format!(
                "{kind} {ticket} {fence} {} {}",
                std::process::id(),
                now_us()
            );
            let push = redis::cmd("RPUSH").arg(self.key(key)).arg(entry).clone();
            if let Err(e) = self.conn.query::<u64>(&push).await {
                say(&format!("error true log: {e}{}", self.tag));
            }
        }
    }

    /// One critical section: log the grant, read the counter, hold, write the
    /// counter, log the release, release. Log and counter failures are
    /// reported and the section goes on (the test sees the gap).
    async fn section(&self, guard: LockGuard, hold: Option<Duration>, deadline: Instant) {
        let tag = &self.tag;
        let (ticket, fence) = (guard.ticket(), guard.fencing_token());
        say(&format!("acquired {ticket} {fence}{tag}"));
        self.log("grant", ticket, fence).await;
        if self.args.log_key.is_some()
            && self.args.check_held
            && !matches!(guard.is_held().await, Ok(true))
        {
            say(&format!("late {ticket} {fence}{tag}"));
            self.log("late", ticket, fence).await;
        }
        let counter = self.args.counter_key.as_deref().map(|k| self.key(k));
        let mut read = None;
        if let Some(key) = &counter {
            match self
                .conn
                .query::<Option<u64>>(redis::cmd("GET").arg(key))
                .await
            {
                Ok(value) => read = Some(value.unwrap_or(0)),
                Err(e) => say(&format!("error true counter: {e}{tag}")),
            }
        }
        match hold {
            Some(hold) if !hold.is_zero() => tokio::time::sleep(hold).await,
            Some(_) => {}
            // Until killed (the test's job), or the time is up.
            None => tokio::time::sleep_until(deadline.into()).await,
        }
        if let (Some(key), Some(read)) = (&counter, read) {
            let set = redis::cmd("SET").arg(key).arg(read + 1).clone();
            if let Err(e) = self.conn.query::<()>(&set).await {
                say(&format!("error true counter: {e}{tag}"));
            }
        }
        self.log("release", ticket, fence).await;
        match guard.release().await {
            Ok(()) => say(&format!("released {ticket}{tag}")),
            Err(LockError::Expired { .. }) => say(&format!("expired {ticket}{tag}")),
            Err(e) => report(&e, tag),
        }
    }
}
