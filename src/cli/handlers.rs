//! The handler tasks of one `simulate` process, and the store and probes
//! they use.
//!
//! A handler pulls the next message in arrival order, calls
//! [`LockStore::lock_with`] for its conversation (which takes the ticket at
//! once) and handles it under the lock. The handling is built to break loudly
//! without the lock: an overlap probe, a non-atomic read-modify-write of a
//! counter, and a grant log of ticket numbers that must come out in FIFO
//! order. What the store got wrong is counted; the store (or Redis) failing
//! stops the handlers and is reported apart, as a failure of the store.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::{Barrier, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use ticketlock::{LockError, LockOptions, LockStore};

use super::plan::Plan;
use super::report::Samples;
use super::state::{now_ns, Shared};
use super::{store_error, CliError};

/// The lock store the arguments name, in memory or in Redis; both read and
/// check `TICKET_LOCK_LIFETIME` the same way. A rejected setting
/// (TICKET_LOCK_LIFETIME, key prefix) is exit 2; failing to reach the store
/// or a bad URL is exit 3.
pub(crate) async fn open_store(plan: &Plan) -> Result<LockStore, CliError> {
    let config = plan.redis.as_ref();
    LockStore::create(config).await.map_err(|e| match config {
        Some(config) => store_error(config, e),
        None => CliError::usage(e.to_string()),
    })
}

/// The probes' home: this process's memory, or Redis.
pub(crate) async fn open_shared(plan: &Plan) -> Result<Shared, CliError> {
    let Some(config) = &plan.redis else {
        return Ok(Shared::memory(plan.conversations as usize));
    };
    Shared::redis(config, &plan.run_id, &plan.conversation_ids())
        .await
        .map_err(|e| store_error(config, e))
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
    /// Set when the store failed: no new message is taken.
    stop: AtomicBool,
    /// The store's first failure, and a wake-up for whoever waits for it.
    failure: Mutex<Option<String>>,
    failed: Notify,
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
    let lifetime = plan.lifetime.unwrap_or(store.default_lifetime());
    let handlers = Arc::new(Handlers {
        store,
        shared,
        conversation_ids: plan.conversation_ids(),
        options: LockOptions::default().with_lifetime(lifetime),
        hold: plan.hold,
        no_lock: plan.no_lock,
        arrivals,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        failed: Notify::new(),
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
    let mut aborted = false;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(samples)) => total.merge(samples),
                Some(Err(e)) if e.is_cancelled() => {}
                Some(Err(e)) => total.error(format!("a handler task failed: {e}")),
            },
            // Once the store failed, the other handlers' calls to it would
            // each wait out a socket timeout (some one after another): the
            // run is over, so they are cancelled (their tickets are given
            // back in the background) and what they measured is dropped.
            () = handlers.failed.notified(), if !aborted => {
                tasks.abort_all();
                aborted = true;
            }
        }
    }
    if let Some(failure) = lock(&handlers.failure).take() {
        total.store_failed(failure);
    }
    total
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

impl Handlers {
    /// The store or Redis failed: stop taking messages, and report it as a
    /// failure of the store (exit 3), not as a broken invariant.
    fn store_failed(&self, message: String) {
        self.stop.store(true, Ordering::Relaxed);
        lock(&self.failure).get_or_insert(message);
        self.failed.notify_one();
    }

    /// A lock error: the store failing (backend errors), or what the store
    /// did (counted against its invariants).
    fn lock_error(&self, samples: &mut Samples, error: LockError) {
        match error {
            LockError::Backend { .. } => self.store_failed(error.to_string()),
            error => samples.error(error.to_string()),
        }
    }
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
            h.lock_error(samples, e);
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
            // Redis failed under the probes: the run is over. The guard's
            // drop gives the lock back in the background; waiting here for
            // a release through the same failed Redis would only add a
            // socket timeout.
            h.store_failed(format!(
                "probe of conversation {cid} (ticket {ticket}) failed: {e}"
            ));
            return;
        }
    }
    if let Err(e) = guard.release().await {
        h.lock_error(samples, e);
    }
}

/// `--no-lock`: the same handling without the lock; the arrival number
/// stands in for the ticket.
async fn unguarded(h: &Handlers, c: usize, number: u64, samples: &mut Samples) {
    if let Err(e) = critical_section(h, c, number, samples).await {
        h.store_failed(format!("probe failed: {e}"));
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
    // 3. Counter write and grant log. A failed probe ends the run (the
    // store failed), so nothing after it needs to stay balanced.
    h.shared.commit(c, entered.counter + 1, ticket).await?;
    samples.handled += 1;
    // 5. Note the release start and leave.
    h.shared.leave(c).await?;
    // 4. The hand-off latency is computed by the caller from this.
    Ok(entered.released_at)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
