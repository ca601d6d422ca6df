//! `ticketlock simulate`: a chatbot fleet in miniature.
//!
//! Messages of `C` conversations arrive interleaved (round robin). `W` handler
//! tasks per process pull the next message in arrival order, call
//! [`LockStore::lock_with`] for its conversation (which takes the ticket at
//! once) and handle it under the lock. The handling is built to break loudly
//! without the lock: an overlap probe, a non-atomic read-modify-write of a
//! counter, and a grant log of ticket numbers that must come out in FIFO order.
//! With `--processes P` the messages are dealt to `P` child processes sharing
//! one Redis; the probes then live in Redis too.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::Instant;

use ticketlock::{LockError, LockOptions, LockStore, StoreConfig, MAX_LIFETIME};

use super::children;
use super::report::{Samples, Setup, Summary};
use super::state::{now_ns, Shared};
use super::{
    is_memory_url, parse_prefix, print_error, print_out, redact_url, store_error, CliError,
    EXIT_CODES,
};

/// Most messages one run may simulate (samples are kept in memory).
const MAX_MESSAGES: u64 = 1_000_000;
/// How long removing the queues of an abandoned run may take.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `ticketlock simulate`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES)]
pub(crate) struct SimulateArgs {
    /// Concurrent handler tasks per process. Each pulls the next message in
    /// arrival order, takes its ticket, handles it under the lock, releases,
    /// and pulls the next.
    #[arg(short, long, value_name = "W", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    workers: u32,

    /// Bot instances: 1 runs in this process; more start that many child
    /// processes of this program, each taking every P-th message (needs --redis).
    #[arg(short, long, value_name = "P", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    processes: u32,

    /// Conversations whose messages arrive interleaved.
    #[arg(short, long, value_name = "C", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    conversations: u32,

    /// Messages per conversation.
    #[arg(short, long, value_name = "M", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    messages: u32,

    /// Milliseconds spent inside each critical section.
    #[arg(long, value_name = "MS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    hold: u64,

    /// Lifetime of each ticket in seconds (fractions allowed), waiting included.
    #[arg(long, value_name = "SECS", default_value = "60",
          value_parser = parse_lifetime, allow_negative_numbers = true)]
    lifetime: Duration,

    /// Redis to run against (redis://[user:password@]host[:port][/db] or
    /// rediss://...). Default: the in-memory store (so does an empty value or memory://).
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    redis: Option<String>,

    /// ASCII-alphanumeric prefix of the lock's keys (<PREFIX>:lock:...;
    /// default lock:...). Only with --redis.
    #[arg(long, value_name = "PREFIX", value_parser = parse_prefix)]
    key_prefix: Option<String>,

    /// Print the summary as one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,

    /// Testing the checks: handle the messages without taking the lock
    /// (every invariant should then break).
    #[arg(long, hide = true)]
    no_lock: bool,

    /// Internal: run as child process INDEX of a --processes run.
    #[arg(long, value_name = "INDEX", hide = true)]
    child: Option<u32>,

    /// Internal: the run a child process belongs to.
    #[arg(long, value_name = "ID", hide = true, value_parser = parse_prefix)]
    run_id: Option<String>,
}

fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| "not a number of seconds".to_owned())?;
    if !secs.is_finite() {
        return Err("the lifetime must be a finite number of seconds".into());
    }
    if secs <= 0.0 {
        return Err("the lifetime must be greater than zero".into());
    }
    if secs > MAX_LIFETIME.as_secs_f64() {
        return Err(format!(
            "the lifetime may be at most {} seconds",
            MAX_LIFETIME.as_secs()
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The checked arguments of one run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) workers: u32,
    pub(crate) processes: u32,
    pub(crate) conversations: u32,
    pub(crate) messages: u32,
    pub(crate) hold: Duration,
    pub(crate) lifetime: Duration,
    pub(crate) redis: Option<String>,
    pub(crate) key_prefix: Option<String>,
    pub(crate) json: bool,
    pub(crate) verbose: u8,
    pub(crate) no_lock: bool,
    pub(crate) run_id: String,
}

impl Plan {
    fn new(args: &SimulateArgs, verbose: u8) -> Result<Plan, CliError> {
        let redis = args
            .redis
            .as_deref()
            .filter(|url| !is_memory_url(url))
            .map(str::to_owned);
        if args.processes > 1 && redis.is_none() {
            return Err(CliError::usage(format!(
                "--processes {} needs --redis (the in-memory store lives in one process)",
                args.processes
            )));
        }
        if args.key_prefix.is_some() && redis.is_none() {
            return Err(CliError::usage(
                "--key-prefix needs --redis (it names Redis keys)",
            ));
        }
        let total = u64::from(args.conversations) * u64::from(args.messages);
        if total > MAX_MESSAGES {
            return Err(CliError::usage(format!(
                "--conversations x --messages is {total}; at most {MAX_MESSAGES} messages per run"
            )));
        }
        let run_id = match (args.child, &args.run_id) {
            (None, None) => new_run_id(),
            (Some(index), Some(id)) if index < args.processes && args.processes > 1 => id.clone(),
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
            redis,
            key_prefix: args.key_prefix.clone(),
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

    fn setup(&self) -> Setup {
        Setup {
            run_id: self.run_id.clone(),
            backend: if self.redis.is_some() {
                "redis"
            } else {
                "memory"
            },
            redis: self.redis.as_deref().map(redact_url),
            key_prefix: self.key_prefix.clone(),
            processes: self.processes,
            workers: self.workers,
            conversations: self.conversations,
            messages_per_conversation: self.messages,
            hold_ms: self.hold.as_millis() as u64,
            lifetime_s: self.lifetime.as_secs_f64(),
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

/// Runs `ticketlock simulate`.
pub(crate) async fn run(args: SimulateArgs, verbose: u8) -> Result<ExitCode, CliError> {
    let plan = Plan::new(&args, verbose)?;
    if let Some(index) = args.child {
        return children::run_child(&plan, index).await;
    }
    let store = open_store(&plan).await?;
    let shared = open_shared(&plan).await?;
    tracing::debug!(run_id = %plan.run_id, "simulation starts");

    let bar = plan.progress_bar();
    let run = async {
        if plan.processes > 1 {
            // The children open connections of their own.
            children::run_parent(&plan, &shared, &bar).await
        } else {
            Ok(run_here(&plan, store.clone(), &shared, &bar).await)
        }
    };
    let result = tokio::select! {
        result = run => result,
        () = interrupted() => Err(CliError::interrupted()),
    };
    bar.finish_and_clear();
    let (samples, elapsed) = match result {
        Ok(done) => done,
        Err(e) => {
            abandon(&plan, &store).await;
            let _ = cleanup(&plan, &shared).await;
            return Err(e);
        }
    };
    let outcomes = shared.outcomes().await;
    let cleaned = cleanup(&plan, &shared).await;
    let outcomes = outcomes.map_err(|e| {
        let mut message = format!(
            "cannot read the results from {}: {e}",
            plan.redis.as_deref().map(redact_url).unwrap_or_default()
        );
        if let Some(first) = &samples.first_error {
            message.push_str(&format!(
                " (after {} lock error(s), the first: {first})",
                samples.errors
            ));
        }
        CliError::store(message)
    })?;
    let summary = Summary::new(plan.setup(), plan.total(), samples, &outcomes, elapsed);

    if plan.json {
        let line = serde_json::to_string(&summary)
            .map_err(|e| CliError::store(format!("cannot encode the summary: {e}")))?;
        print_out(&format!("{line}\n"));
    } else {
        print_out(&summary.table());
    }
    if summary.ok {
        // Only line on stderr then; a failed run's line says more.
        if let Err(e) = cleaned {
            print_error(&e);
        }
        Ok(ExitCode::SUCCESS)
    } else {
        print_error(&summary.failure_line());
        Ok(ExitCode::FAILURE)
    }
}

/// Resolves on Ctrl-C; never if the signal cannot be watched.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// After an interruption or a failed child: remove the run's queues rather
/// than leave them to expire (best effort, bounded in time).
async fn abandon(plan: &Plan, store: &LockStore) {
    let removal = async {
        for cid in plan.conversation_ids() {
            if let Err(e) = store.delete_lock(&cid).await {
                tracing::debug!(conversation_id = %cid, error = %e, "could not delete the queue");
                return;
            }
        }
    };
    let _ = tokio::time::timeout(ABANDON_TIMEOUT, removal).await;
}

/// Deletes the probe keys; the error says which keys are left.
async fn cleanup(plan: &Plan, shared: &Shared) -> Result<(), String> {
    shared.cleanup().await.map_err(|e| {
        tracing::debug!(error = %e, "could not delete the probe keys");
        format!("could not delete the probe keys sim:{}:*: {e}", plan.run_id)
    })
}

/// The lock store the arguments name. A rejected setting (TICKET_LOCK_LIFETIME,
/// key prefix) is exit 2; failing to reach the store or a bad URL is exit 3.
pub(crate) async fn open_store(plan: &Plan) -> Result<LockStore, CliError> {
    let Some(url) = &plan.redis else {
        return Ok(LockStore::in_memory());
    };
    let mut config = StoreConfig::redis(url.clone());
    config.key_prefix = plan.key_prefix.clone();
    LockStore::create(Some(&config))
        .await
        .map_err(|e| store_error(url, e))
}

/// The probes' home: this process's memory, or Redis.
pub(crate) async fn open_shared(plan: &Plan) -> Result<Shared, CliError> {
    let Some(url) = &plan.redis else {
        return Ok(Shared::memory(plan.conversations as usize));
    };
    Shared::redis(url, &plan.run_id, &plan.conversation_ids())
        .await
        .map_err(|e| CliError::store(format!("cannot connect to {}: {e}", redact_url(url))))
}

/// One process's share of the run, in this process (`--processes 1`).
async fn run_here(
    plan: &Plan,
    store: LockStore,
    shared: &Shared,
    bar: &ProgressBar,
) -> (Samples, f64) {
    let started = Instant::now();
    let samples = run_handlers(plan, store, shared.clone(), plan.arrivals(0), bar.clone()).await;
    (samples, started.elapsed().as_secs_f64())
}

/// What every handler task of a process shares.
struct Handlers {
    store: LockStore,
    shared: Shared,
    conversation_ids: Vec<String>,
    options: LockOptions,
    hold: Duration,
    no_lock: bool,
    arrivals: Vec<(u32, u64)>,
    next: AtomicUsize,
    /// Set when the backend failed: no new message is taken.
    stop: AtomicBool,
    bar: ProgressBar,
}

/// Runs `plan.workers` handler tasks over `arrivals` and merges what they measured.
pub(crate) async fn run_handlers(
    plan: &Plan,
    store: LockStore,
    shared: Shared,
    arrivals: Vec<(u32, u64)>,
    bar: ProgressBar,
) -> Samples {
    let workers = (plan.workers as usize).min(arrivals.len());
    let handlers = Arc::new(Handlers {
        store,
        shared,
        conversation_ids: plan.conversation_ids(),
        options: LockOptions::default().with_lifetime(plan.lifetime),
        hold: plan.hold,
        no_lock: plan.no_lock,
        arrivals,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        bar,
    });
    // All handlers start together, not one by one as they are spawned.
    let start = Arc::new(Barrier::new(workers + 1));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (handlers, start) = (handlers.clone(), start.clone());
        tasks.spawn(async move {
            start.wait().await;
            worker(handlers).await
        });
    }
    start.wait().await;
    let mut total = Samples::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(samples) => total.merge(samples),
            Err(e) => total.error(format!("a handler task failed: {e}")),
        }
    }
    total
}

/// One handler: pull the next message in arrival order, handle it, repeat.
async fn worker(h: Arc<Handlers>) -> Samples {
    let mut samples = Samples::default();
    while !h.stop.load(Ordering::Relaxed) {
        let i = h.next.fetch_add(1, Ordering::Relaxed);
        let Some(&(c, number)) = h.arrivals.get(i) else {
            return samples;
        };
        if h.no_lock {
            unguarded(&h, c as usize, number, &mut samples).await;
        } else {
            handle(&h, c as usize, &mut samples).await;
        }
        h.bar.inc(1);
    }
    samples
}

/// One message: take the ticket, run the critical section, release.
async fn handle(h: &Handlers, c: usize, samples: &mut Samples) {
    let cid = &h.conversation_ids[c];
    let called_at = now_ns();
    let called = Instant::now();
    let guard = match h.store.lock_with(cid, h.options).await {
        Ok(guard) => guard,
        Err(e) => {
            tracing::debug!(conversation_id = %cid, error = %e, "lock failed");
            if matches!(e, LockError::Backend { .. }) {
                // The store is unreachable or broken: stop rather than fail
                // every remaining message one by one.
                h.stop.store(true, Ordering::Relaxed);
            }
            samples.error(e.to_string());
            return;
        }
    };
    let acquired_at = now_ns();
    samples.wait_ns.push(duration_ns(called.elapsed()));
    let ticket = guard.ticket();

    match critical_section(h, c, ticket, samples).await {
        Ok(Some(released_at)) if released_at >= called_at => {
            // We were queued when the previous holder let go: a real hand-off.
            samples
                .handoff_ns
                .push(acquired_at.saturating_sub(released_at));
        }
        Ok(_) => {}
        Err(e) => {
            h.stop.store(true, Ordering::Relaxed);
            samples.error(format!(
                "probe of conversation {cid} (ticket {ticket}) failed: {e}"
            ));
        }
    }
    if let Err(e) = guard.release().await {
        samples.error(e.to_string());
    }
}

/// `--no-lock`: the same handling without the lock; the arrival number
/// stands in for the ticket.
async fn unguarded(h: &Handlers, c: usize, number: u64, samples: &mut Samples) {
    if let Err(e) = critical_section(h, c, number, samples).await {
        h.stop.store(true, Ordering::Relaxed);
        samples.error(format!("probe failed: {e}"));
    }
}

/// Steps 1-5 of a critical section; returns when the previous holder started
/// releasing, if anyone held the lock before.
async fn critical_section(
    h: &Handlers,
    c: usize,
    ticket: u64,
    samples: &mut Samples,
) -> redis::RedisResult<Option<u64>> {
    // 1. Overlap probe (and the reads for 2 and 4).
    let entered = h.shared.enter(c).await?;
    if entered.overlap {
        samples.overlaps += 1;
        tracing::debug!(conversation_id = %h.conversation_ids[c], ticket, "critical sections overlap");
    }
    // 2. A deliberately non-atomic increment: read (above), yield, write.
    tokio::task::yield_now().await;
    if !h.hold.is_zero() {
        tokio::time::sleep(h.hold).await;
    }
    // 3. Counter write and grant log.
    let committed = h.shared.commit(c, entered.counter + 1, ticket).await;
    if committed.is_ok() {
        samples.handled += 1;
    }
    // 5. Note the release start and leave, even if the commit failed.
    let left = h.shared.leave(c).await;
    committed?;
    left?;
    // 4. The hand-off latency is computed by the caller from this.
    Ok(entered.released_at)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
