//! What one `ticketlock simulate` run is: its arguments, checked into a
//! [`Plan`] that the parent, its child processes and the handler tasks share.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ticketlock::{LockOptions, StoreConfig};

use super::report::Setup;
use super::state::now_ns;
use super::{redis_config, CliError, StoreArgs, EXIT_CODES};

/// Most messages one run may simulate (samples are kept in memory).
const MAX_MESSAGES: u64 = 1_000_000;

/// Arguments of `ticketlock simulate`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES)]
pub(crate) struct SimulateArgs {
    /// Concurrent handler tasks per process. Each pulls the next message in
    /// arrival order, takes its ticket, handles it under the lock, releases,
    /// and pulls the next.
    #[arg(short, long, value_name = "W", default_value_t = 8, value_parser = count(100_000))]
    workers: u32,

    /// Bot instances: 1 runs in this process; more start that many child
    /// processes of this program, each taking every P-th message (needs --redis).
    #[arg(short, long, value_name = "P", default_value_t = 1, value_parser = count(64))]
    processes: u32,

    /// Conversations whose messages arrive interleaved.
    #[arg(short, long, value_name = "C", default_value_t = 4, value_parser = count(100_000))]
    conversations: u32,

    /// Messages per conversation.
    #[arg(short, long, value_name = "M", default_value_t = 100, value_parser = count(1_000_000))]
    messages: u32,

    /// Milliseconds spent inside each critical section.
    #[arg(long, value_name = "MS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    hold: u64,

    /// The lease of each lock in seconds (fractions allowed), counted from the
    /// grant: waiting in the queue does not use it up. Default: the store's,
    /// TICKET_LOCK_LIFETIME or else 60.
    #[arg(long, value_name = "SECS", value_parser = parse_lifetime, allow_negative_numbers = true)]
    lifetime: Option<Duration>,

    #[command(flatten)]
    store: StoreArgs,

    /// Print the summary as one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,

    /// Testing the checks: handle the messages without taking the lock
    /// (every invariant should then break).
    #[arg(long, hide = true)]
    no_lock: bool,

    /// Internal: run as child process INDEX of a --processes run.
    #[arg(long, value_name = "INDEX", hide = true)]
    pub(crate) child: Option<u32>,

    /// Internal: the run a child process belongs to.
    #[arg(long, value_name = "ID", hide = true)]
    run_id: Option<String>,
}

/// Seconds as text become a duration here; whether it is a usable lifetime
/// is the library's rule ([`LockOptions::check`]).
fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let lifetime = text
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| "not a positive, finite number of seconds".to_owned())?;
    LockOptions::default()
        .with_lifetime(lifetime)
        .check()
        .map_err(|e| e.to_string())?;
    Ok(lifetime)
}

/// A count from 1 to `max`.
fn count(max: i64) -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=max)
}

/// The checked arguments of one run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Handler tasks per process.
    pub(crate) workers: u32,
    /// Bot instances; above 1, child processes of this program.
    pub(crate) processes: u32,
    pub(crate) conversations: u32,
    /// Messages per conversation.
    pub(crate) messages: u32,
    /// Time spent inside each critical section.
    pub(crate) hold: Duration,
    /// `--lifetime`; `None`: the store's default lifetime.
    pub(crate) lifetime: Option<Duration>,
    /// `--redis` as given (child processes get it through `REDIS_URL`).
    pub(crate) redis_url: Option<String>,
    /// `--redis` parsed, `--key-prefix` included; `None` in memory.
    pub(crate) redis: Option<StoreConfig>,
    /// Print the summary as one JSON line.
    pub(crate) json: bool,
    /// `-v` given this many times.
    pub(crate) verbose: u8,
    /// Handle messages without the lock (to see what the checks catch).
    pub(crate) no_lock: bool,
    /// Names this run's conversations and probe keys.
    pub(crate) run_id: String,
}

impl Plan {
    pub(crate) fn new(args: &SimulateArgs, verbose: u8) -> Result<Plan, CliError> {
        let mut redis = redis_config(args.store.redis.as_deref())?;
        if args.processes > 1 && redis.is_none() {
            return Err(CliError::usage(format!(
                "--processes {} needs --redis (the in-memory store lives in one process)",
                args.processes
            )));
        }
        match (&mut redis, &args.store.key_prefix) {
            (Some(config), prefix) => config.key_prefix = prefix.clone(),
            (None, Some(_)) => {
                return Err(CliError::usage(
                    "--key-prefix needs --redis (it names Redis keys)",
                ))
            }
            (None, None) => {}
        }
        let total = u64::from(args.conversations) * u64::from(args.messages);
        if total > MAX_MESSAGES {
            return Err(CliError::usage(format!(
                "--conversations x --messages is {total}; at most {MAX_MESSAGES} messages per run"
            )));
        }
        let run_id = match (args.child, &args.run_id) {
            (None, None) => new_run_id(),
            (Some(index), Some(id))
                if index < args.processes && args.processes > 1 && is_run_id(id) =>
            {
                id.clone()
            }
            _ => {
                return Err(CliError::usage(
                    "--child and --run-id are internal: they are set by a --processes run",
                ))
            }
        };
        Ok(Plan {
            workers: args.workers,
            processes: args.processes,
            conversations: args.conversations,
            messages: args.messages,
            hold: Duration::from_millis(args.hold),
            lifetime: args.lifetime,
            redis_url: redis.is_some().then(|| args.store.redis.clone()).flatten(),
            redis,
            json: args.json,
            verbose,
            no_lock: args.no_lock,
            run_id,
        })
    }

    pub(crate) fn total(&self) -> u64 {
        u64::from(self.conversations) * u64::from(self.messages)
    }

    /// Conversation ids: unique per run, so runs never share a queue.
    pub(crate) fn conversation_ids(&self) -> Vec<String> {
        (0..self.conversations)
            .map(|c| format!("sim-{}-{c}", self.run_id))
            .collect()
    }

    /// The messages process `index` handles, in arrival order, as
    /// (conversation index, number within the conversation): message `i` of
    /// the whole run is message `i / C` of conversation `i % C` and goes to
    /// process `i % P`.
    pub(crate) fn arrivals(&self, index: u32) -> Vec<(u32, u64)> {
        let c = u64::from(self.conversations);
        (0..self.total())
            .filter(|i| i % u64::from(self.processes) == u64::from(index))
            .map(|i| ((i % c) as u32, i / c))
            .collect()
    }

    /// The run's parameters as the summary echoes them; `lifetime` is the
    /// one the locks got.
    pub(crate) fn setup(&self, lifetime: Duration) -> Setup {
        Setup {
            run_id: self.run_id.clone(),
            backend: if self.redis.is_some() {
                "redis"
            } else {
                "memory"
            },
            redis: self.redis.as_ref().map(ToString::to_string),
            key_prefix: self.redis.as_ref().and_then(|c| c.key_prefix.clone()),
            processes: self.processes,
            workers: self.workers,
            conversations: self.conversations,
            messages_per_conversation: self.messages,
            hold_ms: self.hold.as_millis() as u64,
            lifetime_s: lifetime.as_secs_f64(),
        }
    }

    /// A progress bar on stderr: hidden with --json or -v, and (by indicatif)
    /// when stderr is not a terminal.
    pub(crate) fn progress_bar(&self) -> ProgressBar {
        if self.json || self.verbose > 0 {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(self.total()), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} messages",
        ) {
            bar.set_style(style);
        }
        bar
    }
}

/// What [`new_run_id`] makes: base 36 digits. Run ids name Redis keys
/// (`sim:<run id>:...`), so a child takes no other.
fn is_run_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// Alphanumeric and unique enough: pid and wall-clock nanoseconds.
fn new_run_id() -> String {
    format!(
        "{}{}",
        base36(u128::from(std::process::id())),
        base36(u128::from(now_ns()))
    )
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}
