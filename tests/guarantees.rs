//! The guarantees at their edges, where a real server stalls or a process
//! does: a timed-out `lock` leaves no ghost holder, `with_timeout` holds while
//! Redis is frozen, a guard dropped while its runtime shuts down still
//! releases, and a holder whose process stalled across the hand-over never
//! believes it holds after the store moved on. (The cases both backends
//! share are in `conformance.rs`.)

mod support;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::RedisServer;
use ticketlock::{LockError, LockOptions, LockStore, StoreConfig};

const LONG: Duration = Duration::from_secs(30);

fn patient() -> LockOptions {
    LockOptions::default()
        .with_lifetime(LONG)
        .with_wait_time(LONG)
        .with_dead_waiter_timeout(LONG)
}

async fn store_with_timeout(server: &RedisServer, socket_timeout: Duration) -> LockStore {
    let mut config = StoreConfig::redis(server.url());
    config.socket_timeout = Some(socket_timeout.as_secs_f64());
    LockStore::create(Some(&config)).await.expect("connect")
}

/// Freezes `server` for `frozen`, in a thread, starting now.
fn freeze(server: &RedisServer, frozen: Duration) -> std::thread::JoinHandle<()> {
    server.sigstop();
    let pid = server.pid();
    std::thread::spawn(move || {
        std::thread::sleep(frozen);
        let _ = std::process::Command::new("sh")
            .args(["-c", "kill -s CONT \"$1\"", "sh", &pid.to_string()])
            .status();
    })
}

/// An issue that outran its caller (a timeout while Redis was frozen) runs
/// when Redis thaws; the request-id cancel gives its ticket back, whichever
/// ran first, so nobody waits for a holder that is gone (issue 10 item 7,
/// issue 12 item 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_lock_leaves_no_ghost_holder() {
    let server = RedisServer::start();
    let store = store_with_timeout(&server, Duration::from_millis(500)).await;
    // Warm up: scripts loaded, connection open.
    store.lock("ghost").await.unwrap().release().await.unwrap();

    let thaw = freeze(&server, Duration::from_millis(1500));
    let started = Instant::now();
    let err = store
        .lock_with("ghost", patient().with_timeout(Duration::from_millis(200)))
        .await
        .unwrap_err();
    let gave_up = started.elapsed();
    assert!(matches!(err, LockError::Timeout { .. }), "{err}");
    assert!(
        gave_up < Duration::from_millis(600),
        "the timeout waited for Redis: {gave_up:?}"
    );
    let ticket_err = store.issue_ticket("ghost-fixed", LONG).await.unwrap_err();
    assert!(ticket_err.is_retryable(), "{ticket_err}");
    thaw.join().unwrap();

    // Redis is back: the frozen issues ran or never will; either way no
    // ticket of the callers that gave up holds or blocks the queues.
    let other = store_with_timeout(&server, Duration::from_secs(2)).await;
    for cid in ["ghost", "ghost-fixed"] {
        let started = Instant::now();
        let g = tokio::time::timeout(Duration::from_secs(3), other.lock_with(cid, patient()))
            .await
            .unwrap_or_else(|_| panic!("{cid}: a ghost holder blocks the queue"))
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{cid}: {:?}",
            started.elapsed()
        );
        let lock = other.get_lock(cid).await.unwrap().unwrap();
        assert_eq!(
            lock.tickets().len(),
            1,
            "{cid}: tickets left by a caller that gave up: {lock:?}"
        );
        g.release().await.unwrap();
        assert_eq!(other.get_lock(cid).await.unwrap(), None, "{cid}");
    }
}

/// `with_timeout` bounds every await of `lock_with`, the issue, the
/// subscription and the polls included, also while Redis does not answer
/// (issue 12 item 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_timeout_holds_while_redis_is_frozen() {
    let server = RedisServer::start();
    let store = store_with_timeout(&server, Duration::from_secs(5)).await;
    let holder = store.lock_with("frozen", patient()).await.unwrap();
    // Frozen before the issue.
    let thaw = freeze(&server, Duration::from_millis(1200));
    let started = Instant::now();
    let err = store
        .lock_with("frozen", patient().with_timeout(Duration::from_millis(200)))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, LockError::Timeout { ticket: None, .. }),
        "{err}"
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    thaw.join().unwrap();

    // Frozen while waiting (polls and check-ins unanswered).
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let options = patient()
                .with_wait_time(Duration::from_millis(50))
                .with_timeout(Duration::from_millis(600));
            (store.lock_with("frozen", options).await, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let thaw = freeze(&server, Duration::from_millis(1500));
    let (result, took) = waiting.await.unwrap();
    assert!(
        matches!(
            result,
            Err(LockError::Timeout {
                ticket: Some(_),
                ..
            })
        ),
        "{result:?}"
    );
    assert!(took < Duration::from_millis(900), "{took:?}");
    thaw.join().unwrap();
    holder.release().await.unwrap();
    // Nothing of the waiters that gave up is left.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lock = store.get_lock("frozen").await.unwrap();
    assert!(
        lock.as_ref().is_none_or(|l| l.tickets().is_empty()),
        "{lock:?}"
    );
}

/// A bot that exits gracefully drops its guards while its runtime shuts
/// down, or after it is gone: the locks are released all the same, so the
/// next process does not wait for the lease (issue 12 item 10).
#[test]
fn guards_dropped_while_the_runtime_shuts_down_release_their_locks() {
    let server = RedisServer::start();
    let url = server.url();
    let check = |cid: &str| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let store = LockStore::from_url(&url).await.unwrap();
            let started = Instant::now();
            let g = tokio::time::timeout(Duration::from_secs(5), store.lock_with(cid, patient()))
                .await
                .unwrap_or_else(|_| panic!("{cid}: still held after its runtime was gone"))
                .unwrap();
            let waited = started.elapsed();
            g.release().await.unwrap();
            waited
        })
    };

    // Held in a task when the runtime is dropped.
    {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (held, acquired) = mpsc::channel();
        let url = url.clone();
        runtime.spawn(async move {
            let store = LockStore::from_url(&url).await.unwrap();
            let guard = store.lock_with("shutdown", patient()).await.unwrap();
            held.send(()).unwrap();
            std::future::pending::<()>().await;
            drop(guard);
        });
        acquired.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(runtime);
    }
    let waited = check("shutdown");
    assert!(waited < Duration::from_secs(2), "{waited:?}");

    // Taken out of the runtime and dropped after it is gone.
    let guard = {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let store = LockStore::from_url(&url).await.unwrap();
            store.lock_with("outside", patient()).await.unwrap()
        })
    };
    drop(guard);
    let waited = check("outside");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
}

/// The in-memory store needs no runtime to release: a guard dropped after
/// its runtime is gone gives the lock back at once.
#[test]
fn in_memory_guards_release_without_a_runtime() {
    let store = LockStore::in_memory();
    let guard = {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(store.lock_with("m", patient())).unwrap()
    };
    drop(guard);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let next = runtime.block_on(async {
        tokio::time::timeout(Duration::from_millis(500), store.lock_with("m", patient())).await
    });
    drop(next.expect("still held").unwrap());
}

/// A waiter whose process stalls across the hand-over (here: its runtime's
/// one thread blocked) learns of its grant late. Its guard's deadline comes
/// from the store's, counted from when it asked, so it never believes it
/// holds the lock after the store served the next waiter (issue 12 item 5a).
#[test]
fn a_holder_stalled_across_the_hand_over_never_outlives_the_stores_lease() {
    let server = RedisServer::start();
    for backend in ["memory", "redis"] {
        for stall in [Duration::from_millis(150), Duration::from_millis(1500)] {
            stalled_hand_over(backend, &server, stall);
        }
    }
}

fn stalled_hand_over(backend: &str, server: &RedisServer, stall: Duration) {
    let cid = format!("stall-{}", stall.as_millis());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(async {
        match backend {
            "redis" => LockStore::from_url(&server.url()).await.unwrap(),
            _ => LockStore::in_memory(),
        }
    });
    let lease = Duration::from_millis(400);
    let holder = runtime.block_on(store.lock_with(&cid, patient())).unwrap();

    // The waiter: a runtime of its own on one thread, which a message can block.
    let (stalls, mut stall_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let (done_tx, done_rx) = mpsc::channel();
    let (waiter_store, waiter_cid) = (store.clone(), cid.clone());
    let waiter = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            tokio::spawn(async move {
                while let Some(stall) = stall_rx.recv().await {
                    std::thread::sleep(stall);
                }
            });
            let options = patient()
                .with_lifetime(lease)
                .with_dead_waiter_timeout(LONG);
            match waiter_store.lock_with(&waiter_cid, options).await {
                Ok(guard) => {
                    guard.lost().await;
                    done_tx.send(Some(Instant::now())).unwrap();
                    // A stalled bot would go on; it never releases in time.
                    std::mem::forget(guard);
                }
                Err(e) => {
                    assert!(matches!(e, LockError::Expired { .. }), "{e}");
                    done_tx.send(None).unwrap();
                }
            }
        });
    });
    runtime.block_on(async {
        while store.get_lock(&cid).await.unwrap().unwrap().tickets().len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    stalls.send(stall).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    runtime.block_on(holder.release()).unwrap();
    let next = runtime
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(5), store.lock_with(&cid, patient())).await
        })
        .expect("the queue stalled")
        .unwrap();
    let next_served = Instant::now();
    let lost_at = done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    if let Some(lost_at) = lost_at {
        assert!(
            lost_at <= next_served,
            "{backend}, stalled {stall:?}: the holder believed it held {:?} after the next one was served",
            lost_at - next_served
        );
    }
    runtime.block_on(next.release()).unwrap();
    waiter.join().unwrap();
}
