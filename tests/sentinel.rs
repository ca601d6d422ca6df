//! Redis Sentinel: one master, one replica (`--replicaof`), one sentinel
//! (`redis-server <conf> --sentinel`), all private on 127.0.0.1 and stopped
//! by pid. The store finds the master through the sentinel, and follows it
//! through a `SENTINEL FAILOVER` without being rebuilt.
//!
//! The data nodes run with `min-replicas-to-write 1`: Redis replicates
//! asynchronously, and without it a master that was just replaced would go
//! on accepting writes (grants!) that the failover then throws away. With it,
//! such writes are refused (`NOREPLICAS`, retryable) until the store follows
//! the sentinel to the new master.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{redis_cli, wait_for};
use ticketlock::{DeploymentMode, LockError, LockOptions, LockStore, StoreConfig};

const SERVICE: &str = "mymaster";
const PROMPT: Duration = Duration::from_secs(2);

use support::SentinelDeployment as Deployment;

fn deploy() -> Deployment {
    Deployment::start(SERVICE)
}

/// A sentinel config for `deployment` with a fresh key prefix.
fn config(d: &Deployment) -> StoreConfig {
    let mut config = StoreConfig::redis("127.0.0.1");
    config.deployment_mode = DeploymentMode::Sentinel;
    config.endpoints = vec![d.sentinel.endpoint()];
    config.sentinel_service = Some(SERVICE.to_owned());
    config.key_prefix = Some(support::unique_prefix("sent"));
    config.socket_timeout = Some(2.0);
    config
}

/// Waits without polling (30 s between checks): only a push hands over promptly.
fn patient() -> LockOptions {
    LockOptions::default()
        .with_wait_time(Duration::from_secs(30))
        .with_timeout(Duration::from_secs(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_finds_the_master_through_the_sentinel() {
    let d = deploy();
    let config = config(&d);
    let prefix = config.key_prefix.clone().unwrap();
    let a = LockStore::create(Some(&config))
        .await
        .expect("sentinel config");
    let b = LockStore::create(Some(&config))
        .await
        .expect("sentinel config");
    let guard = a.lock_with("s1", patient()).await.unwrap();
    // The record is on the master (Rasa's db 1), and replicated.
    let key = format!("{prefix}:lock:{{s1}}");
    assert_eq!(
        redis_cli(d.master.port(), &["-n", "1", "EXISTS", &key]),
        "1"
    );
    wait_for(
        "the replica has it",
        Duration::from_secs(5),
        || match redis_cli(d.replica.port(), &["-n", "1", "EXISTS", &key]).as_str() {
            "1" => Ok(()),
            other => Err(other.to_owned()),
        },
    );
    guard.release().await.unwrap();
    let took = support::pushed_handoff(&a, &b, "s2").await;
    assert!(took < PROMPT, "hand-off took {took:?}");

    // The URL form (db 0 unless the URL names one).
    let url = format!("redis+sentinel://{}/{SERVICE}", d.sentinel.endpoint());
    let by_url = LockStore::from_url(&url)
        .await
        .expect("redis+sentinel:// url");
    by_url
        .lock_with("s3", patient())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let by_url_db = LockStore::from_url(&format!("{url}/4"))
        .await
        .expect("url with db");
    let g = by_url_db.lock_with("s4", patient()).await.unwrap();
    assert_eq!(
        redis_cli(d.master.port(), &["-n", "4", "EXISTS", "lock:{s4}"]),
        "1"
    );
    g.release().await.unwrap();

    // An unknown master name: a clear error, not retryable.
    let mut unknown = config.clone();
    unknown.sentinel_service = Some("nosuchmaster".into());
    let e = LockStore::create(Some(&unknown)).await.unwrap_err();
    println!("unknown master name: {e}");
    assert!(matches!(e, LockError::Backend { .. }), "{e:?}");
    assert!(!e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains("\"nosuchmaster\""), "{e}");

    // No sentinel listening: a retryable error within the socket timeout.
    let mut nobody = config.clone();
    let port = support::RedisServer::start().port(); // started and dropped: a free, closed port
    nobody.endpoints = vec![format!("127.0.0.1:{port}")];
    let started = Instant::now();
    let e = LockStore::create(Some(&nobody)).await.unwrap_err();
    println!("no sentinel: {e} after {:?}", started.elapsed());
    assert!(e.is_retryable(), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

/// What the workers of a [`Run`] saw.
#[derive(Default)]
struct Tally {
    sections: usize,
    errors: BTreeMap<String, usize>,
    /// Non-retryable errors, in full.
    fatal: Vec<String>,
    first_error: Option<Instant>,
    last_error: Option<Instant>,
    /// `sections` when the last error came.
    sections_at_last_error: usize,
}

/// Workers that lock, do a non-atomic read-modify-write, and release, in a
/// loop, on two conversations through two stores; they note every error and
/// go on.
struct Run {
    tally: Arc<Mutex<Tally>>,
    overlaps: Arc<AtomicUsize>,
    counters: Arc<Vec<AtomicUsize>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Run {
    fn start(stores: &[LockStore; 2]) -> Run {
        const CONVERSATIONS: [&str; 2] = ["f1", "f2"];
        let inside: Arc<Vec<AtomicUsize>> =
            Arc::new(CONVERSATIONS.iter().map(|_| AtomicUsize::new(0)).collect());
        let counters: Arc<Vec<AtomicUsize>> =
            Arc::new(CONVERSATIONS.iter().map(|_| AtomicUsize::new(0)).collect());
        let overlaps = Arc::new(AtomicUsize::new(0));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        // A lock whose release failed frees itself after 3 s.
        let options = LockOptions::default()
            .with_lifetime(Duration::from_secs(3))
            .with_wait_time(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(10));
        let mut workers = Vec::new();
        for w in 0..6 {
            let store = stores[w % 2].clone();
            let i = w % CONVERSATIONS.len();
            let cid = CONVERSATIONS[i];
            let (inside, counters, overlaps, tally, stop) = (
                inside.clone(),
                counters.clone(),
                overlaps.clone(),
                tally.clone(),
                stop.clone(),
            );
            workers.push(tokio::spawn(async move {
                let note = |e: &LockError| {
                    let mut t = tally.lock().unwrap();
                    let now = Instant::now();
                    t.first_error.get_or_insert(now);
                    t.last_error = Some(now);
                    t.sections_at_last_error = t.sections;
                    let kind = match e {
                        LockError::Backend { source, .. } => {
                            let s = source.to_string();
                            let head: String = s.chars().take(40).collect();
                            format!("backend: {head}")
                        }
                        other => format!("{other:?}")
                            .split([' ', '{'])
                            .next()
                            .unwrap_or("")
                            .to_owned(),
                    };
                    *t.errors.entry(kind).or_default() += 1;
                    if !e.is_retryable() {
                        t.fatal.push(format!("{e:?}"));
                    }
                };
                while !stop.load(Ordering::SeqCst) {
                    match store.lock_with(cid, options).await {
                        Ok(g) => {
                            if inside[i].fetch_add(1, Ordering::SeqCst) != 0 {
                                overlaps.fetch_add(1, Ordering::SeqCst);
                            }
                            let read = counters[i].load(Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            counters[i].store(read + 1, Ordering::SeqCst);
                            inside[i].fetch_sub(1, Ordering::SeqCst);
                            tally.lock().unwrap().sections += 1;
                            if let Err(e) = g.release().await {
                                note(&e);
                            }
                        }
                        Err(e) => {
                            note(&e);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        Run {
            tally,
            overlaps,
            counters,
            stop,
            workers,
        }
    }

    fn sections(&self) -> usize {
        self.tally.lock().unwrap().sections
    }

    fn errors(&self) -> BTreeMap<String, usize> {
        self.tally.lock().unwrap().errors.clone()
    }

    /// Waits (up to `limit`) until the workers have gone 2 s and 30 critical
    /// sections without an error since `since`.
    async fn wait_until_serving_again(&self, since: Instant, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let done = {
                let t = self.tally.lock().unwrap();
                let quiet_since = t.last_error.map_or(since, |e| e.max(since));
                quiet_since.elapsed() > Duration::from_secs(2)
                    && t.sections >= t.sections_at_last_error + 30
            };
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the store did not serve again within {limit:?}: {:?}",
                self.errors()
            );
        }
    }

    /// Stops the workers and checks: no error that is not retryable, no two
    /// holders at once, no lost update. Returns the tally.
    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .expect("a worker hangs")
                .unwrap();
        }
        let tally = Arc::try_unwrap(self.tally)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap();
        assert!(
            tally.fatal.is_empty(),
            "non-retryable errors: {:#?}",
            tally.fatal
        );
        assert_eq!(
            self.overlaps.load(Ordering::SeqCst),
            0,
            "two holders at once"
        );
        let counted: usize = self.counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
        assert_eq!(counted, tally.sections, "lost updates");
        tally
    }
}

/// Five pushed hand-offs between the stores (their subscriptions followed
/// the master), after the writes are accepted again.
async fn handoffs_work(stores: &[LockStore; 2]) -> Vec<Duration> {
    let mut took = Vec::new();
    for n in 0..5 {
        let cid = format!("after-{n}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match stores[0].lock_with(&cid, patient()).await {
                Ok(g) => {
                    g.release().await.unwrap();
                    break;
                }
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("after the failover: {e:?}"),
            }
        }
        took.push(support::pushed_handoff(&stores[0], &stores[1], &cid).await);
    }
    assert!(took.iter().all(|t| *t < PROMPT), "{took:?}");
    took
}

/// Waits until the master the sentinel names says it is one and the other
/// node is its replica. Returns the master's port. (On a loaded machine the
/// sentinel may fail over more than once: whichever node it names counts.)
fn wait_until_settled(d: &Deployment) -> u16 {
    let mut master = 0;
    wait_for("one master, one replica", Duration::from_secs(40), || {
        let named = d.sentinel.master_port().ok_or("no master named")?;
        let other = if named == d.master.port() {
            d.replica.port()
        } else {
            d.master.port()
        };
        let (role, other_role) = (redis_cli(named, &["ROLE"]), redis_cli(other, &["ROLE"]));
        if role.starts_with("master") && other_role.starts_with("slave") {
            master = named;
            Ok(())
        } else {
            Err(format!("{named}: {role}\n{other}: {other_role}"))
        }
    });
    master
}

/// How many times the sentinel switched masters (its log, when more than once).
fn switches(d: &Deployment) -> usize {
    let log = d.sentinel.log();
    let n = log.matches("+switch-master").count();
    if n > 1 {
        println!("sentinel log:\n{log}");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_mid_run_costs_only_retryable_errors_and_the_same_store_keeps_serving() {
    let d = deploy();
    let config = config(&d);
    let stores = [
        LockStore::create(Some(&config)).await.expect("connect"),
        LockStore::create(Some(&config)).await.expect("connect"),
    ];
    let run = Run::start(&stores);
    // Warm up on the first master.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = run.sections();
    assert!(
        before > 10,
        "only {before} critical sections before the failover"
    );
    assert!(
        run.errors().is_empty(),
        "errors before the failover: {:?}",
        run.errors()
    );

    let failover_at = Instant::now();
    d.sentinel.failover(Duration::from_secs(20));
    wait_for(
        "the sentinel names the replica",
        Duration::from_secs(20),
        || match d.sentinel.master_port() {
            Some(p) if p == d.replica.port() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let switched_at = Instant::now();
    run.wait_until_serving_again(switched_at, Duration::from_secs(60))
        .await;
    let t = run.finish().await;
    println!(
        "sentinel failover: {} critical sections ({before} before), errors {:?}, all retryable; \
         errors from {:?} to {:?} after SENTINEL FAILOVER (sentinel switched after {:?})",
        t.sections,
        t.errors,
        t.first_error.map(|e| e.duration_since(failover_at)),
        t.last_error.map(|e| e.duration_since(failover_at)),
        switched_at.duration_since(failover_at),
    );
    assert!(t.sections > before + 30);

    // The same stores, on the new master: the old one is a replica now.
    let master = wait_until_settled(&d);
    println!(
        "now on {} (the replica: {}), after {} switch(es)",
        master,
        master == d.replica.port(),
        switches(&d)
    );
    println!(
        "hand-offs on the new master: {:?}",
        handoffs_work(&stores).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_master_is_replaced_and_the_same_store_follows() {
    let mut d = deploy();
    let config = config(&d);
    let stores = [
        LockStore::create(Some(&config)).await.expect("connect"),
        LockStore::create(Some(&config)).await.expect("connect"),
    ];
    let run = Run::start(&stores);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = run.sections();
    assert!(
        before > 10,
        "only {before} critical sections before the crash"
    );

    let crashed_at = Instant::now();
    d.master.stop(); // SIGKILL
    wait_for(
        "the sentinel names the replica",
        Duration::from_secs(30),
        || match d.sentinel.master_port() {
            Some(p) if p == d.replica.port() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let switched_at = Instant::now();
    // The new master wants a replica before it takes writes: the old one,
    // back (empty) on its port, which the sentinel turns into one.
    d.master.restart();
    run.wait_until_serving_again(switched_at, Duration::from_secs(60))
        .await;
    let t = run.finish().await;
    println!(
        "sentinel, master killed: {} critical sections ({before} before), errors {:?}, all retryable; \
         errors from {:?} to {:?} after the kill (sentinel switched after {:?})",
        t.sections,
        t.errors,
        t.first_error.map(|e| e.duration_since(crashed_at)),
        t.last_error.map(|e| e.duration_since(crashed_at)),
        switched_at.duration_since(crashed_at),
    );
    assert!(t.sections > before + 30);
    let master = wait_until_settled(&d);
    println!(
        "now on {} (the replica: {}), after {} switch(es)",
        master,
        master == d.replica.port(),
        switches(&d)
    );
    println!(
        "hand-offs on the new master: {:?}",
        handoffs_work(&stores).await
    );
}
