//! Every fault at every operation, with and without cancellation: a client
//! whose store fails, stalls or hangs at one operation must never stall the
//! queue for the others, never overlap another holder, and never leave a
//! ticket behind for longer than its dead-waiter timeout or lease.
//! (The pattern of deadpool's `managed_cancellation` test.)

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ticketlock::__testing::{with_faults, Injected, Op};
use ticketlock::{LockOptions, LockStore, StoreConfig};

const OPS: [Op; 5] = [Op::Issue, Op::Subscribe, Op::Poll, Op::Release, Op::Extend];
const FAULTS: [Injected; 4] = [
    Injected::FailBefore,
    Injected::FailAfter,
    Injected::Delay(Duration::from_millis(150)),
    Injected::Hang,
];
/// When the client task is cancelled, if at all.
const CANCELS: [Option<Duration>; 3] = [
    None,
    Some(Duration::from_millis(30)),
    Some(Duration::from_millis(200)),
];

/// Short enough that orphans go quickly, long enough for a loaded machine.
fn faulty_options() -> LockOptions {
    LockOptions::default()
        .with_lifetime(Duration::from_millis(600))
        .with_dead_waiter_timeout(Duration::from_millis(400))
        .with_wait_time(Duration::from_millis(100))
        .with_timeout(Duration::from_millis(1500))
        .with_auto_renew(true)
}

fn patient() -> LockOptions {
    LockOptions::default()
        .with_lifetime(Duration::from_secs(30))
        .with_wait_time(Duration::from_secs(30))
}

/// Leaves the critical section when dropped, also when its task is cancelled.
struct Leaves(Arc<AtomicUsize>);

impl Drop for Leaves {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Outcome {
    label: String,
    checker_waited: Duration,
    leftover_for: Duration,
}

async fn scenario(
    base: LockStore,
    cid: String,
    op: Op,
    fault: Injected,
    cancel: Option<Duration>,
) -> Outcome {
    let label = format!("{op:?}/{fault:?}/cancel {cancel:?}");
    let inside = Arc::new(AtomicUsize::new(0));
    let fired = Arc::new(AtomicBool::new(false));
    let faulty = {
        let fired = fired.clone();
        with_faults(&base, move |o| {
            if o == op && !fired.swap(true, Ordering::SeqCst) {
                fault
            } else {
                Injected::Pass
            }
        })
    };

    let holder = base.lock_with(&cid, patient()).await.unwrap();
    let client = {
        let (cid, inside) = (cid.clone(), inside.clone());
        tokio::spawn(async move {
            let guard = faulty.lock_with(&cid, faulty_options()).await?;
            assert_eq!(
                inside.fetch_add(1, Ordering::SeqCst),
                0,
                "two holders at once"
            );
            // Declared after the guard, so it is dropped first: a client
            // cancelled inside its section leaves it before its lock is
            // released (by the guard's drop).
            let section = Leaves(inside);
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(section);
            guard.release().await
        })
    };
    if let Some(after) = cancel {
        let abort = client.abort_handle();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            abort.abort();
        });
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    holder.release().await.unwrap();

    // The queue must not stall: a patient checker gets the lock soon after
    // whatever the client left behind lapses.
    let started = Instant::now();
    let checker = tokio::time::timeout(Duration::from_secs(5), base.lock_with(&cid, patient()))
        .await
        .unwrap_or_else(|_| panic!("{label}: the queue stalled"))
        .unwrap_or_else(|e| panic!("{label}: checker failed: {e}"));
    let checker_waited = started.elapsed();
    assert_eq!(
        inside.fetch_add(1, Ordering::SeqCst),
        0,
        "{label}: checker overlapped the client"
    );
    inside.fetch_sub(1, Ordering::SeqCst);
    checker.release().await.unwrap();
    // The client ends, one way or another (its own timeout bounds it).
    let _ = tokio::time::timeout(Duration::from_secs(5), client).await;

    // No ticket is left behind for longer than a dead-waiter timeout or lease.
    let started = Instant::now();
    loop {
        base.update_lock(&cid).await.unwrap();
        match base.get_lock(&cid).await.unwrap() {
            None => break,
            Some(lock) if lock.tickets().is_empty() => break,
            Some(lock) => {
                assert!(
                    started.elapsed() < Duration::from_secs(3),
                    "{label}: tickets left behind: {lock:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Outcome {
        label,
        checker_waited,
        leftover_for: started.elapsed(),
    }
}

async fn all_scenarios(base: LockStore, tag: &str) {
    let mut tasks = Vec::new();
    for (i, op) in OPS.into_iter().enumerate() {
        for (j, fault) in FAULTS.into_iter().enumerate() {
            for (k, cancel) in CANCELS.into_iter().enumerate() {
                let cid = format!("{tag}-{i}-{j}-{k}");
                tasks.push(tokio::spawn(scenario(base.clone(), cid, op, fault, cancel)));
            }
        }
    }
    let mut worst = Duration::ZERO;
    for task in tasks {
        let outcome = task.await.expect("scenario panicked");
        if outcome.checker_waited > worst {
            worst = outcome.checker_waited;
            eprintln!(
                "{}: checker waited {:?}, leftovers gone after {:?}",
                outcome.label, outcome.checker_waited, outcome.leftover_for
            );
        }
    }
    // Worst case: an orphaned renewing ticket granted at the holder's release
    // waits out its pick-up window (the dead-waiter timeout), or a client
    // whose release hangs holds its lease.
    assert!(worst < Duration::from_secs(3), "worst stall {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_at_every_operation_in_memory() {
    all_scenarios(LockStore::in_memory(), "mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_at_every_operation_on_redis() {
    let mut config = StoreConfig::redis(support::redis_url());
    config.key_prefix = Some(support::unique_prefix("faults"));
    let store = LockStore::create(Some(&config)).await.unwrap();
    all_scenarios(store, "redis").await;
}
