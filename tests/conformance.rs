//! One suite, every backend: each case runs against the in-memory store and
//! against a real `redis-server` and `valkey-server` (started by `support`),
//! once with EVALSHA and once with the Functions library, which is what
//! proves the Lua scripts and the in-memory state machine keep the same rules.
//!
//! Long on purpose: one short case per rule, all in one file so that one
//! macro runs every case on every fixture and none can be left out.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ticketlock::__testing::{with_faults, Injected, Op};
use ticketlock::{LockError, LockOptions, LockStore, ScriptMode, StoreConfig, Ticket, TicketLock};

/// "Promptly": far below the wait times and lifetimes the cases configure, so
/// a case only passes if wake-ups (not polls or expiries) did the work.
const PROMPT: Duration = Duration::from_secs(2);
const LONG: Duration = Duration::from_secs(30);

/// A store plus, for Redis, a way to look at its keys.
struct Fixture {
    store: LockStore,
    redis: Option<(redis::Client, String)>,
    /// A Redis Cluster's nodes (keys are looked for on each); empty otherwise.
    nodes: Vec<redis::Client>,
}

impl Fixture {
    async fn memory() -> Fixture {
        Fixture {
            store: LockStore::in_memory(),
            redis: None,
            nodes: Vec::new(),
        }
    }

    /// The shared 3-master Redis Cluster (`redis+cluster://`), under a fresh prefix.
    async fn cluster(mode: ScriptMode) -> Fixture {
        let prefix = support::unique_prefix("clu");
        let mut config = StoreConfig::redis(support::cluster_url());
        config.key_prefix = Some(prefix.clone());
        config.script_mode = mode;
        let store = LockStore::create(Some(&config))
            .await
            .expect("connect to the test cluster");
        let nodes: Vec<redis::Client> = support::shared_cluster()
            .endpoints()
            .iter()
            .map(|e| redis::Client::open(format!("redis://{e}")).unwrap())
            .collect();
        Fixture {
            store,
            redis: Some((nodes[0].clone(), format!("{prefix}:lock:"))),
            nodes,
        }
    }

    async fn redis(mode: ScriptMode) -> Fixture {
        Self::standalone(support::redis_url(), mode).await
    }

    /// A `valkey-server` (Valkey 9, shared by this test binary).
    async fn valkey(mode: ScriptMode) -> Fixture {
        Self::standalone(support::valkey_url(), mode).await
    }

    async fn standalone(url: String, mode: ScriptMode) -> Fixture {
        let prefix = support::unique_prefix("conf");
        let mut config = StoreConfig::redis(url.clone());
        config.key_prefix = Some(prefix.clone());
        config.script_mode = mode;
        let store = LockStore::create(Some(&config))
            .await
            .expect("connect to the test redis");
        Fixture {
            store,
            redis: Some((redis::Client::open(url).unwrap(), format!("{prefix}:lock:"))),
            nodes: Vec::new(),
        }
    }

    /// A Redis store whose connection runs as an ACL user that may touch only
    /// its own prefix and run only what ticketlock needs: the README's
    /// minimal rule, proven sufficient by running the whole suite under it.
    async fn redis_acl(mode: ScriptMode) -> Fixture {
        let url = support::redis_url();
        let prefix = support::unique_prefix("acl");
        let client = redis::Client::open(url.clone()).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        let user = format!("u{prefix}");
        let mut setuser = redis::cmd("ACL");
        setuser
            .arg("SETUSER")
            .arg(&user)
            .arg("on")
            .arg(">pw")
            .arg("resetkeys")
            .arg("resetchannels");
        setuser
            .arg(format!("~{prefix}:lock:*"))
            .arg(format!("&{prefix}:lock:*"));
        for rule in MINIMAL_ACL.split_whitespace() {
            setuser.arg(rule);
        }
        let _: () = setuser.query_async(&mut admin).await.unwrap();
        let mut config = StoreConfig::redis(url);
        config.key_prefix = Some(prefix.clone());
        config.script_mode = mode;
        config.username = Some(user);
        config.password = Some("pw".into());
        config.db = Some(0);
        let store = LockStore::create(Some(&config))
            .await
            .expect("connect as the limited user");
        Fixture {
            store,
            redis: Some((client, format!("{prefix}:lock:"))),
            nodes: Vec::new(),
        }
    }

    /// A store that finds its master through a sentinel (the shared
    /// deployment of `support`: master, replica, sentinel).
    async fn sentinel() -> Fixture {
        let d = support::shared_sentinel();
        let prefix = support::unique_prefix("sent");
        let mut config = StoreConfig::redis("127.0.0.1");
        config.deployment_mode = ticketlock::DeploymentMode::Sentinel;
        config.endpoints = vec![d.sentinel.endpoint()];
        config.sentinel_service = Some("mymaster".to_owned());
        config.key_prefix = Some(prefix.clone());
        config.db = Some(0); // where the fixture's own client looks
        let store = LockStore::create(Some(&config))
            .await
            .expect("connect through the sentinel");
        let client = redis::Client::open(d.master.url()).unwrap();
        Fixture {
            store,
            redis: Some((client, format!("{prefix}:lock:"))),
            nodes: Vec::new(),
        }
    }

    /// A store that finds its master through a sentinel wanting a password
    /// and TLS, in front of data nodes that want the same (one CA).
    async fn secure_sentinel() -> Fixture {
        let d = support::shared_secure_sentinel();
        let prefix = support::unique_prefix("ssen");
        let mut config = StoreConfig::redis("127.0.0.1");
        config.deployment_mode = ticketlock::DeploymentMode::Sentinel;
        config.endpoints = vec![d.sentinel.endpoint()];
        config.sentinel_service = Some("mymaster".to_owned());
        config.sentinel_password = Some(support::SECURE_SENTINEL_PASSWORD.to_owned());
        config.sentinel_use_ssl = true;
        config.password = Some(support::SECURE_DATA_PASSWORD.to_owned());
        config.use_ssl = true;
        config.ssl_ca_certs = Some(d.tls.ca_cert.clone());
        config.key_prefix = Some(prefix.clone());
        config.db = Some(0); // where the fixture's own client looks
        let store = LockStore::create(Some(&config))
            .await
            .expect("connect through the TLS sentinel");
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&d.tls.ca_cert).unwrap()),
        };
        let url = format!(
            "rediss://:{}@127.0.0.1:{}/0",
            support::SECURE_DATA_PASSWORD,
            d.master.port()
        );
        let client = redis::Client::build_with_tls(url, certs).unwrap();
        Fixture {
            store,
            redis: Some((client, format!("{prefix}:lock:"))),
            nodes: Vec::new(),
        }
    }

    /// Every key under this fixture's prefix, with its TTL in ms.
    async fn keys(&self) -> Vec<(String, i64)> {
        let Some((client, prefix)) = &self.redis else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // Every node of a cluster, else the one server.
        for client in self
            .nodes
            .iter()
            .chain(self.nodes.is_empty().then_some(client))
        {
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut conn)
                .await
                .unwrap();
            for k in keys {
                let ttl: i64 = redis::cmd("PTTL")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                out.push((k, ttl));
            }
        }
        out
    }

    async fn raw(&self) -> Option<(redis::aio::MultiplexedConnection, String)> {
        let (client, prefix) = self.redis.as_ref()?;
        Some((
            client.get_multiplexed_async_connection().await.unwrap(),
            prefix.clone(),
        ))
    }

    /// Nothing of `cid` is left: no record, and in Redis no key at all.
    async fn assert_gone(&self, cid: &str) {
        assert_eq!(
            self.store.get_lock(cid).await.unwrap(),
            None,
            "{cid} still has a record"
        );
        let keys = self.keys().await;
        assert!(keys.is_empty(), "keys left behind: {keys:?}");
    }
}

/// The commands ticketlock needs (README, "ACL"); keys and channels are
/// limited to the prefix by the fixture.
const MINIMAL_ACL: &str = "-@all +fcall +fcall_ro +function|load +evalsha +script|load \
    +subscribe +unsubscribe +ping \
    +time +hmget +hgetall +hset +hdel +del +pexpireat +publish +type +pttl";

fn opts(lifetime: Duration) -> LockOptions {
    LockOptions::default()
        .with_lifetime(lifetime)
        .with_wait_time(LONG)
}

/// One module of tests per fixture, each running every case.
macro_rules! suite {
    ($module:ident => $fixture:expr; $($case:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($fixture.await).await
                }
            )*
        }
    };
}

/// Every case against every backend and deployment.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        suite!(in_memory => super::Fixture::memory(); $($case),*);
        suite!(on_redis_eval => super::Fixture::redis(ticketlock::ScriptMode::Eval); $($case),*);
        suite!(on_redis_functions => super::Fixture::redis(ticketlock::ScriptMode::Functions); $($case),*);
        suite!(on_redis_acl => super::Fixture::redis_acl(ticketlock::ScriptMode::Auto); $($case),*);
        suite!(on_redis_acl_eval => super::Fixture::redis_acl(ticketlock::ScriptMode::Eval); $($case),*);
        suite!(on_valkey => super::Fixture::valkey(ticketlock::ScriptMode::Eval); $($case),*);
        suite!(on_valkey_functions => super::Fixture::valkey(ticketlock::ScriptMode::Functions); $($case),*);
        suite!(on_sentinel => super::Fixture::sentinel(); $($case),*);
        suite!(on_secure_sentinel => super::Fixture::secure_sentinel(); $($case),*);
        suite!(on_cluster => super::Fixture::cluster(ticketlock::ScriptMode::Auto); $($case),*);
        suite!(on_cluster_eval => super::Fixture::cluster(ticketlock::ScriptMode::Eval); $($case),*);
    };
}

conformance!(
    numbering_starts_at_zero_and_only_goes_up,
    waiters_are_served_in_ticket_order,
    expired_tickets_are_left_out_and_pruned,
    a_crashed_holder_delays_the_queue_only_until_its_lease_ends,
    finish_keeps_the_record_and_cleanup_removes_it,
    is_someone_waiting_counts_live_tickets,
    snapshots_round_trip_through_save_get_update_delete,
    a_waiter_whose_ticket_expires_gets_expired_promptly,
    a_live_waiter_outlasts_its_lifetime,
    a_dead_waiter_stops_blocking_within_the_dead_waiter_timeout,
    a_release_after_the_lease_lapsed_reports_it,
    fencing_tokens_grow_across_grants_cleanups_and_deletes,
    only_the_holder_extends_and_auto_renew_keeps_the_lease,
    a_waiter_whose_ticket_is_removed_gets_expired_promptly,
    a_stale_ticket_is_never_served_when_its_number_returns,
    a_cancelled_waiter_gives_its_ticket_back,
    a_timeout_gives_the_ticket_back,
    release_hands_over_without_waiting_for_a_poll,
    auto_renew_keeps_a_lock_handed_over_by_a_wake_up,
    a_dropped_guard_releases_in_the_background,
    critical_sections_never_overlap,
    with_lock_releases_even_when_the_work_fails,
    bad_input_is_a_typed_error,
    hostile_ids_stay_apart,
    keys_carry_ttls_and_vanish_after_release,
    a_snapshot_saved_back_unchanged_changes_nothing,
    lost_fires_when_someone_removes_the_holders_ticket,
    a_removed_waiter_learns_it_within_milliseconds,
    a_holder_dead_before_its_pick_up_delays_the_queue_by_its_lease_only,
    a_shorter_lease_is_announced_to_the_waiters,
    a_cancelled_release_still_releases,
    a_retryable_release_failure_is_retried_in_the_background,
    a_failed_pick_up_is_retried_and_the_lease_kept,
    ticket_numbers_stop_below_two_to_the_53,
    fencing_tokens_grow_over_back_to_back_hand_overs,
);

async fn numbering_starts_at_zero_and_only_goes_up(f: Fixture) {
    let s = &f.store;
    for expected in 0..3 {
        assert_eq!(s.issue_ticket("n", LONG).await.unwrap(), expected);
    }
    // Finishing the last ticket does not make its number available again.
    s.finish_serving("n", 2).await.unwrap();
    assert_eq!(s.issue_ticket("n", LONG).await.unwrap(), 3);
    for t in [0, 1, 3] {
        s.cleanup("n", t).await.unwrap();
    }
    f.assert_gone("n").await;
    // A fresh conversation starts at 0 again.
    assert_eq!(s.issue_ticket("n", LONG).await.unwrap(), 0);
    s.cleanup("n", 0).await.unwrap();
}

async fn waiters_are_served_in_ticket_order(f: Fixture) {
    let s = &f.store;
    let first = s.lock_with("fifo", opts(LONG)).await.unwrap();
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 1..=10u64 {
        let (s2, served) = (s.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            let g = s2.lock_with("fifo", opts(LONG)).await.unwrap();
            served.lock().unwrap().push(g.ticket());
            g.release().await.unwrap();
        }));
        // Arrival order is ticket order: wait until this waiter queued.
        while s.get_lock("fifo").await.unwrap().unwrap().tickets().len() < (i + 1) as usize {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    first.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*served.lock().unwrap(), (1..=10).collect::<Vec<_>>());
    f.assert_gone("fifo").await;
}

async fn expired_tickets_are_left_out_and_pruned(f: Fixture) {
    let s = &f.store;
    s.issue_ticket("exp", Duration::from_millis(150))
        .await
        .unwrap();
    s.issue_ticket("exp", LONG).await.unwrap();
    assert_eq!(s.get_lock("exp").await.unwrap().unwrap().tickets().len(), 2);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let lock = s.get_lock("exp").await.unwrap().unwrap();
    assert_eq!(
        lock.tickets()
            .iter()
            .map(Ticket::number)
            .collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(lock.now_serving(), Some(1));
    assert!(lock.is_locked(0) && !lock.is_locked(1));
    assert_eq!(lock.last_issued(), Some(1));
    s.cleanup("exp", 1).await.unwrap();
    f.assert_gone("exp").await;
}

async fn a_crashed_holder_delays_the_queue_only_until_its_lease_ends(f: Fixture) {
    let s = &f.store;
    let holder = s
        .lock_with("crash", opts(Duration::from_millis(300)))
        .await
        .unwrap();
    // A crashed process never releases: forget the guard without running its drop.
    std::mem::forget(holder);
    let start = Instant::now();
    let g = s.lock_with("crash", opts(LONG)).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(g.ticket(), 1);
    assert!(
        waited >= Duration::from_millis(250),
        "served before the lease ended: {waited:?}"
    );
    assert!(
        waited < PROMPT,
        "served {waited:?} after the lease ended (wait_time is {LONG:?})"
    );
    g.release().await.unwrap();
    f.assert_gone("crash").await;
}

async fn finish_keeps_the_record_and_cleanup_removes_it(f: Fixture) {
    let s = &f.store;
    let a = s.issue_ticket("fin", LONG).await.unwrap();
    let b = s.issue_ticket("fin", LONG).await.unwrap();
    s.finish_serving("fin", a).await.unwrap();
    let lock = s.get_lock("fin").await.unwrap().unwrap();
    assert_eq!(lock.now_serving(), Some(b));
    s.finish_serving("fin", b).await.unwrap();
    let lock = s
        .get_lock("fin")
        .await
        .unwrap()
        .expect("finish keeps the record");
    assert!(lock.tickets().is_empty());
    assert_eq!(lock.last_issued(), Some(b));
    assert_eq!(s.issue_ticket("fin", LONG).await.unwrap(), b + 1);
    // Cleanup with someone still queued keeps the record...
    let d = s.issue_ticket("fin", LONG).await.unwrap();
    s.cleanup("fin", b + 1).await.unwrap();
    assert_eq!(
        s.get_lock("fin").await.unwrap().unwrap().now_serving(),
        Some(d)
    );
    // ...and removes it with the last ticket.
    s.cleanup("fin", d).await.unwrap();
    f.assert_gone("fin").await;
    // Removing a ticket that does not exist is harmless.
    s.cleanup("fin", 99).await.unwrap();
    s.finish_serving("fin", 99).await.unwrap();
    f.assert_gone("fin").await;
}

async fn is_someone_waiting_counts_live_tickets(f: Fixture) {
    let s = &f.store;
    assert!(!s.is_someone_waiting("w").await.unwrap());
    let t = s
        .issue_ticket("w", Duration::from_millis(150))
        .await
        .unwrap();
    assert!(s.is_someone_waiting("w").await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!s.is_someone_waiting("w").await.unwrap());
    s.cleanup("w", t).await.unwrap();
    f.assert_gone("w").await;
}

async fn snapshots_round_trip_through_save_get_update_delete(f: Fixture) {
    let s = &f.store;
    assert_eq!(s.get_lock("rt").await.unwrap(), None);
    let empty = s.get_or_create_lock("rt").await.unwrap();
    assert_eq!(empty, LockStore::create_lock("rt"));
    // An empty lock needs no storage.
    s.save_lock(&empty).await.unwrap();
    f.assert_gone("rt").await;

    let mut lock = TicketLock::new("rt");
    for _ in 0..5 {
        lock.issue_ticket(LONG);
    }
    lock.remove_ticket_for(0);
    lock.remove_ticket_for(2);
    s.save_lock(&lock).await.unwrap();
    let got = s.get_or_create_lock("rt").await.unwrap();
    assert_eq!(
        got.tickets().iter().map(Ticket::number).collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
    assert_eq!(got.last_issued(), Some(4));
    assert!(got
        .tickets()
        .iter()
        .all(|t| t.expires_in() > LONG - PROMPT && t.expires_in() <= LONG));
    // Numbers never go down, not even through save.
    assert_eq!(s.issue_ticket("rt", LONG).await.unwrap(), 5);
    let stale = TicketLock::new("rt");
    s.save_lock(&stale).await.unwrap();
    assert_eq!(s.issue_ticket("rt", LONG).await.unwrap(), 6);

    // update_lock prunes expired tickets.
    let mut short = TicketLock::new("rt2");
    short.issue_ticket(Duration::from_millis(100));
    short.issue_ticket(LONG);
    s.save_lock(&short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.update_lock("rt2").await.unwrap();
    let pruned = s.get_lock("rt2").await.unwrap().unwrap();
    assert_eq!(pruned.tickets().len(), 1);
    assert_eq!(pruned.now_serving(), Some(1));

    for cid in ["rt", "rt2"] {
        s.delete_lock(cid).await.unwrap();
        assert_eq!(s.get_lock(cid).await.unwrap(), None);
    }
    s.delete_lock("rt").await.unwrap();
    f.assert_gone("rt").await;
}

async fn a_waiter_whose_ticket_expires_gets_expired_promptly(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("ew", opts(LONG)).await.unwrap();
    let s2 = s.clone();
    let quick_checks = opts(LONG).with_dead_waiter_timeout(Duration::from_millis(600));
    let waiter = tokio::spawn(async move { s2.lock_with("ew", quick_checks).await });
    while s.get_lock("ew").await.unwrap().unwrap().tickets().len() < 2 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Someone rewrites the queue so that the waiter's ticket is a fixed one
    // that expires in 200 ms; nothing announces an expiry.
    let mut lock = s.get_lock("ew").await.unwrap().unwrap();
    lock.remove_ticket_for(1);
    let mut rewritten = TicketLock::new("ew");
    rewritten.issue_ticket(LONG);
    rewritten.issue_ticket(Duration::from_millis(200));
    s.save_lock(&rewritten).await.unwrap();
    let start = Instant::now();
    let err = waiter.await.unwrap().unwrap_err();
    assert!(matches!(err, LockError::Expired { ticket: 1, .. }), "{err}");
    assert!(start.elapsed() < PROMPT, "took {:?}", start.elapsed());
    assert!(err.to_string().contains("ew"), "{err}");
    // Ticket 0 kept its grant through the save (same head), so its holder releases it.
    holder.release().await.unwrap();
    f.assert_gone("ew").await;
}

async fn a_live_waiter_outlasts_its_lifetime(f: Fixture) {
    let s = &f.store;
    let short = LockOptions::default()
        .with_lifetime(Duration::from_millis(200))
        .with_dead_waiter_timeout(Duration::from_millis(300))
        .with_wait_time(LONG);
    let holder = s.lock_with("lw", opts(LONG)).await.unwrap();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { s2.lock_with("lw", short).await });
    // Waiting ten times the lifetime and three times the dead-waiter timeout
    // costs the live waiter nothing.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!waiter.is_finished());
    holder.release().await.unwrap();
    let g = served(waiter, "served").await;
    assert_eq!(g.ticket(), 1);
    // The lease counts from the grant: 200 ms.
    assert!(g.is_held().await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!g.is_held().await.unwrap());
    assert!(matches!(g.release().await, Err(LockError::Expired { .. })));
    s.delete_lock("lw").await.unwrap();
    f.assert_gone("lw").await;
}

async fn a_release_after_the_lease_lapsed_reports_it(f: Fixture) {
    let s = &f.store;
    let g = s
        .lock_with("rl", opts(Duration::from_millis(150)))
        .await
        .unwrap();
    // Nobody touches the conversation meanwhile, so nothing pruned the ticket.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        g.release().await,
        Err(LockError::Expired { ticket: 0, .. })
    ));
    s.delete_lock("rl").await.unwrap();
    f.assert_gone("rl").await;
}

async fn a_dead_waiter_stops_blocking_within_the_dead_waiter_timeout(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("dw", opts(LONG)).await.unwrap();
    // A waiter whose process dies: its future is leaked, so it neither checks
    // in nor gives its ticket back.
    let dying = opts(LONG).with_dead_waiter_timeout(Duration::from_millis(300));
    let mut doomed = Box::pin(s.lock_with("dw", dying));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), doomed.as_mut())
            .await
            .is_err()
    );
    std::mem::forget(doomed);
    let s2 = s.clone();
    let next = tokio::spawn(async move { s2.lock_with("dw", opts(LONG)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    let g = served(next, "the dead waiter blocked the queue").await;
    let waited = released.elapsed();
    assert_eq!(g.ticket(), 2);
    assert!(
        waited < Duration::from_millis(1500),
        "the queue moved on after {waited:?}"
    );
    g.release().await.unwrap();
    f.assert_gone("dw").await;
}

async fn fencing_tokens_grow_across_grants_cleanups_and_deletes(f: Fixture) {
    let s = &f.store;
    let mut last = 0;
    for round in 0..20 {
        let g = s.lock_with("fe", opts(LONG)).await.unwrap();
        assert!(
            g.fencing_token() > last,
            "round {round}: {} after {last}",
            g.fencing_token()
        );
        last = g.fencing_token();
        match round % 3 {
            0 => g.release().await.unwrap(), // cleanup deletes the record
            1 => {
                s.delete_lock("fe").await.unwrap();
                drop(g);
            }
            _ => {
                // A hand-over inside one record.
                let s2 = s.clone();
                let waiter =
                    tokio::spawn(async move { s2.lock_with("fe", opts(LONG)).await.unwrap() });
                tokio::time::sleep(Duration::from_millis(20)).await;
                g.release().await.unwrap();
                let g2 = waiter.await.unwrap();
                assert!(g2.fencing_token() > last);
                last = g2.fencing_token();
                g2.release().await.unwrap();
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.assert_gone("fe").await;
}

async fn only_the_holder_extends_and_auto_renew_keeps_the_lease(f: Fixture) {
    let s = &f.store;
    let short = LockOptions::default()
        .with_lifetime(Duration::from_millis(300))
        .with_wait_time(LONG);
    let g = s.lock_with("ex", short).await.unwrap();
    g.extend(Duration::from_millis(1500)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        g.is_held().await.unwrap(),
        "extend did not lengthen the lease"
    );
    g.release().await.unwrap();

    let renewing = short.with_auto_renew(true);
    let g = s.lock_with("ex", renewing).await.unwrap();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { s2.lock_with("ex", opts(LONG)).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        g.is_held().await.unwrap(),
        "auto-renew let a 300 ms lease lapse"
    );
    assert!(!waiter.is_finished(), "a second holder got in");
    // lost() does not fire while renewed.
    assert!(tokio::time::timeout(Duration::from_millis(200), g.lost())
        .await
        .is_err());
    g.release().await.unwrap();
    let g2 = served(waiter, "not served in time").await;

    // Without renewal the lease lapses and lost() says so.
    drop(g2);
    // The lease is counted from the grant, conservatively (never past the
    // store's end of it), so the clock starts before asking.
    let started = Instant::now();
    let g = s.lock_with("ex", short).await.unwrap();
    tokio::time::timeout(PROMPT, g.lost())
        .await
        .expect("lost() never fired");
    // Earlier than the lease by at most what the asking took (the deadline
    // is counted from when the question was sent): generous on a busy machine.
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(
        g.extend(Duration::from_secs(5)).await,
        Err(LockError::Expired { .. })
    ));
    drop(g);
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.update_lock("ex").await.unwrap();
    s.delete_lock("ex").await.unwrap();
    f.assert_gone("ex").await;
}

async fn a_waiter_whose_ticket_is_removed_gets_expired_promptly(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("rw", opts(LONG)).await.unwrap();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { s2.lock_with("rw", opts(LONG)).await });
    while s.get_lock("rw").await.unwrap().unwrap().tickets().len() < 2 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let start = Instant::now();
    s.finish_serving("rw", 1).await.unwrap();
    // Nothing announces a removed waiter; it must notice by itself when the
    // head changes or its own ticket would have expired. Here the head is
    // unchanged, so make the head change: the holder leaves.
    holder.release().await.unwrap();
    let err = waiter.await.unwrap().unwrap_err();
    assert!(matches!(err, LockError::Expired { ticket: 1, .. }), "{err}");
    assert!(start.elapsed() < PROMPT, "took {:?}", start.elapsed());
    f.assert_gone("rw").await;
}

async fn a_stale_ticket_is_never_served_when_its_number_returns(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("st", opts(LONG)).await.unwrap();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { s2.lock_with("st", opts(LONG)).await });
    while s.get_lock("st").await.unwrap().unwrap().tickets().len() < 2 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Delete the record: numbering restarts, so ticket 1 will exist again.
    s.delete_lock("st").await.unwrap();
    let new0 = s.lock_with("st", opts(LONG)).await.unwrap();
    assert_eq!(new0.ticket(), 0);
    let new1 = s.issue_ticket("st", LONG).await.unwrap();
    assert_eq!(new1, 1);
    let err = waiter.await.unwrap().unwrap_err();
    assert!(matches!(err, LockError::Expired { ticket: 1, .. }), "{err}");
    // The old holder's release must not remove the new ticket 0.
    let err = holder.release().await.unwrap_err();
    assert!(matches!(err, LockError::Expired { ticket: 0, .. }), "{err}");
    assert_eq!(
        s.get_lock("st").await.unwrap().unwrap().now_serving(),
        Some(0)
    );
    new0.release().await.unwrap();
    s.cleanup("st", new1).await.unwrap();
    f.assert_gone("st").await;
}

async fn a_cancelled_waiter_gives_its_ticket_back(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("cx", opts(LONG)).await.unwrap();
    let cancelled =
        tokio::time::timeout(Duration::from_millis(100), s.lock_with("cx", opts(LONG))).await;
    assert!(
        cancelled.is_err(),
        "the waiter should still have been waiting"
    );
    let s2 = s.clone();
    let next = tokio::spawn(async move {
        let g = s2.lock_with("cx", opts(LONG)).await.unwrap();
        let ticket = g.ticket();
        g.release().await.unwrap();
        ticket
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    holder.release().await.unwrap();
    let ticket = tokio::time::timeout(PROMPT, next)
        .await
        .expect("ticket 1 was not given back")
        .unwrap();
    assert_eq!(ticket, 2);
    assert!(start.elapsed() < PROMPT);
    f.assert_gone("cx").await;
}

async fn a_timeout_gives_the_ticket_back(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("to", opts(LONG)).await.unwrap();
    let start = Instant::now();
    let err = s
        .lock_with("to", opts(LONG).with_timeout(Duration::from_millis(200)))
        .await
        .unwrap_err();
    let waited = start.elapsed();
    assert!(
        matches!(
            err,
            LockError::Timeout {
                ticket: Some(1),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(
        waited >= Duration::from_millis(200) && waited < PROMPT,
        "{waited:?}"
    );
    assert!(err.to_string().starts_with("timed out after"), "{err}");
    let lock = s.get_lock("to").await.unwrap().unwrap();
    assert_eq!(
        lock.tickets()
            .iter()
            .map(Ticket::number)
            .collect::<Vec<_>>(),
        vec![0]
    );
    holder.release().await.unwrap();
    f.assert_gone("to").await;
}

/// A lock taken on a hand-over's wake-up (its grant picked up in the
/// background, not by a poll) is renewed like any other.
async fn auto_renew_keeps_a_lock_handed_over_by_a_wake_up(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("rw", opts(LONG)).await.unwrap();
    let renewing = LockOptions::default()
        .with_lifetime(Duration::from_millis(600))
        .with_wait_time(LONG)
        .with_auto_renew(true);
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { s2.lock_with("rw", renewing).await });
    queued(s, "rw", 2).await;
    // Soon after the waiter's first check-in, so that the wake-up alone
    // serves it (a grant that close to the check-in needs no poll).
    tokio::time::sleep(Duration::from_millis(100)).await;
    holder.release().await.unwrap();
    let g = served(waiter, "not served in time").await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(
        g.is_held().await.unwrap(),
        "auto-renew let a 600 ms lease lapse after a hand-over"
    );
    g.release().await.unwrap();
    f.assert_gone("rw").await;
}

async fn release_hands_over_without_waiting_for_a_poll(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("ho", opts(LONG)).await.unwrap();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        let g = s2.lock_with("ho", opts(LONG)).await.unwrap();
        let at = Instant::now();
        g.release().await.unwrap();
        at
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    let acquired = waiter.await.unwrap();
    assert!(
        acquired.duration_since(released) < PROMPT,
        "{:?}",
        acquired.duration_since(released)
    );
    f.assert_gone("ho").await;
}

async fn a_dropped_guard_releases_in_the_background(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("dg", opts(LONG)).await.unwrap();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        s2.lock_with("dg", opts(LONG))
            .await
            .unwrap()
            .release()
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(holder);
    served(waiter, "drop did not release").await;
    f.assert_gone("dg").await;
}

async fn critical_sections_never_overlap(f: Fixture) {
    let s = &f.store;
    let inside = Arc::new(AtomicUsize::new(0));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (s, inside, counter) = (s.clone(), inside.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let g = s.lock_with("ex", opts(LONG)).await.unwrap();
            assert_eq!(
                inside.fetch_add(1, Ordering::SeqCst),
                0,
                "two holders at once"
            );
            // A deliberately non-atomic read-modify-write.
            let read = counter.load(Ordering::SeqCst);
            tokio::task::yield_now().await;
            counter.store(read + 1, Ordering::SeqCst);
            inside.fetch_sub(1, Ordering::SeqCst);
            g.release().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 40);
    f.assert_gone("ex").await;
}

async fn with_lock_releases_even_when_the_work_fails(f: Fixture) {
    let s = &f.store;
    let out: Result<Result<(), &str>, LockError> = s
        .with_lock("wl", opts(LONG), |_| async { Err("work failed") })
        .await;
    assert_eq!(out.unwrap(), Err("work failed"));
    f.assert_gone("wl").await;
    let t = s
        .with_lock("wl", opts(LONG), |ticket| async move { ticket })
        .await
        .unwrap();
    assert_eq!(t, 0);
    f.assert_gone("wl").await;
}

async fn bad_input_is_a_typed_error(f: Fixture) {
    let s = &f.store;
    let huge = "x".repeat(ticketlock::MAX_CONVERSATION_ID_LEN + 1);
    let mebibyte = "🙂".repeat(256 * 1024);
    let invalid = |r: Result<(), LockError>| matches!(r, Err(LockError::InvalidInput { .. }));
    for cid in ["", huge.as_str(), mebibyte.as_str()] {
        assert!(
            invalid(s.issue_ticket(cid, LONG).await.map(drop)),
            "{cid:.10}"
        );
        assert!(invalid(s.lock(cid).await.map(drop)));
        assert!(invalid(s.get_lock(cid).await.map(drop)));
        assert!(invalid(s.delete_lock(cid).await));
        assert!(invalid(s.update_lock(cid).await));
        assert!(invalid(s.is_someone_waiting(cid).await.map(drop)));
        assert!(invalid(s.finish_serving(cid, 0).await));
        assert!(invalid(s.cleanup(cid, 0).await));
        assert!(invalid(s.save_lock(&TicketLock::new(cid)).await));
    }
    let err = s.lock(&huge).await.unwrap_err().to_string();
    assert!(
        err.len() < 300,
        "the message repeats the whole id: {} bytes",
        err.len()
    );
    for lifetime in [
        Duration::ZERO,
        Duration::MAX,
        ticketlock::MAX_LIFETIME + Duration::from_secs(1),
    ] {
        assert!(invalid(s.issue_ticket("ok", lifetime).await.map(drop)));
        assert!(invalid(
            s.lock_with("ok", LockOptions::default().with_lifetime(lifetime))
                .await
                .map(drop)
        ));
    }
    assert!(invalid(
        s.lock_with("ok", LockOptions::default().with_wait_time(Duration::ZERO))
            .await
            .map(drop)
    ));
    let mut absurd = TicketLock::new("ok");
    absurd.issue_ticket(Duration::MAX);
    assert!(invalid(s.save_lock(&absurd).await));
    // Nothing was written by any of it.
    f.assert_gone("ok").await;
    // A sub-millisecond lifetime is rounded up, not rejected.
    let t = s
        .issue_ticket("ok", Duration::from_micros(10))
        .await
        .unwrap();
    s.cleanup("ok", t).await.unwrap();
}

async fn hostile_ids_stay_apart(f: Fixture) {
    let s = &f.store;
    let ids = [
        "a",
        "a}",
        "}a",
        "{a}",
        "a%7D",
        "%",
        "*",
        "?",
        "[x]",
        "a:b",
        "a:b:q",
        "lock:{a}",
        "with space",
        "new\nline",
        "nul\0byte",
        "émoji 🙂",
        "ключ",
    ];
    let mut guards = Vec::new();
    for id in ids {
        // Each id is a conversation of its own: all are served at once.
        let g = tokio::time::timeout(PROMPT, s.lock_with(id, opts(LONG)))
            .await
            .expect(id)
            .unwrap();
        assert_eq!(g.ticket(), 0, "{id:?} shares a queue with another id");
        assert_eq!(g.conversation_id(), id);
        guards.push(g);
    }
    for id in ids {
        let lock = s.get_lock(id).await.unwrap().unwrap();
        assert_eq!(lock.tickets().len(), 1, "{id:?}");
        assert_eq!(lock.conversation_id(), id);
    }
    if f.redis.is_some() {
        assert_eq!(f.keys().await.len(), ids.len(), "one key per conversation");
    }
    for g in guards {
        g.release().await.unwrap();
    }
    for id in ids {
        assert_eq!(s.get_lock(id).await.unwrap(), None, "{id:?}");
    }
    f.assert_gone("a").await;
}

async fn keys_carry_ttls_and_vanish_after_release(f: Fixture) {
    let s = &f.store;
    let lifetime = Duration::from_secs(5);
    let g = s.lock_with("ttl", opts(lifetime)).await.unwrap();
    s.issue_ticket("ttl", Duration::from_secs(2)).await.unwrap();
    if f.redis.is_some() {
        let keys = f.keys().await;
        assert_eq!(keys.len(), 1, "{keys:?}");
        for (key, ttl) in keys {
            // Latest expiry (5 s) plus the 1 s margin, never longer, never unset.
            assert!(ttl > 4000 && ttl <= 6000, "{key} has TTL {ttl} ms");
        }
    }
    g.release().await.unwrap();
    s.cleanup("ttl", 1).await.unwrap();
    f.assert_gone("ttl").await;
}

/// Waits until `cid` holds `n` live tickets.
async fn queued(s: &LockStore, cid: &str, n: usize) {
    let started = Instant::now();
    while s
        .get_lock(cid)
        .await
        .unwrap()
        .map_or(0, |l| l.tickets().len())
        < n
    {
        assert!(started.elapsed() < PROMPT, "{cid} never held {n} tickets");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Rasa's read-modify-write (`get_lock`, then `save_lock`) of an unchanged
/// snapshot keeps every ticket's kind and terms and the current grant: the
/// holder keeps its lease and token, the live waiters keep their places.
async fn a_snapshot_saved_back_unchanged_changes_nothing(f: Fixture) {
    let s = &f.store;
    let dead_waiter = Duration::from_millis(600);
    let patient = opts(LONG).with_dead_waiter_timeout(dead_waiter);
    let holder = s.lock_with("sb", patient).await.unwrap();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { s2.lock_with("sb", patient).await });
    queued(s, "sb", 2).await;
    let fixed = s.issue_ticket("sb", LONG).await.unwrap();

    let before = s.get_lock("sb").await.unwrap().unwrap();
    let kinds: Vec<bool> = before.tickets().iter().map(Ticket::is_renewing).collect();
    assert_eq!(kinds, [true, true, false], "{before:?}");
    assert_eq!(before.tickets()[0].lease(), Some(LONG));
    assert_eq!(before.tickets()[1].dead_waiter_timeout(), Some(dead_waiter));
    s.save_lock(&before).await.unwrap();
    let after = s.get_lock("sb").await.unwrap().unwrap();
    assert_eq!(after.next_number(), before.next_number());
    for (a, b) in after.tickets().iter().zip(before.tickets()) {
        assert_eq!(
            (a.number(), a.lease(), a.dead_waiter_timeout()),
            (b.number(), b.lease(), b.dead_waiter_timeout())
        );
        assert!(
            b.expires_in().saturating_sub(a.expires_in()) < PROMPT,
            "{a:?} vs {b:?}"
        );
    }
    // Well past the dead-waiter timeout: the live waiter still waits, the
    // holder still holds with the same token and its whole lease.
    tokio::time::sleep(dead_waiter * 3).await;
    assert!(holder.is_held().await.unwrap(), "the holder lost its grant");
    assert!(!waiter.is_finished(), "the waiter was dropped or served");
    let lock = s.get_lock("sb").await.unwrap().unwrap();
    assert_eq!(lock.tickets().len(), 3, "{lock:?}");
    assert!(
        lock.tickets()[0].expires_in() > LONG - PROMPT - dead_waiter * 3,
        "{lock:?}"
    );
    // No third party gets in beside the holder.
    let third =
        tokio::time::timeout(Duration::from_millis(300), s.lock_with("sb", opts(LONG))).await;
    assert!(third.is_err(), "a third party got in beside the holder");
    holder.release().await.unwrap();
    let next = served(waiter, "not served in time").await;
    assert_eq!(next.ticket(), 1);
    next.release().await.unwrap();
    s.cleanup("sb", fixed).await.unwrap();
    f.assert_gone("sb").await;
}

/// `finish_serving`, `cleanup` (of the only ticket: the fast path that
/// deletes the record), `delete_lock` or a `save_lock` without the held
/// ticket: the store says so at once, and `lost()` listens.
async fn lost_fires_when_someone_removes_the_holders_ticket(f: Fixture) {
    let s = &f.store;
    for how in [
        "finish",
        "finish with a waiter",
        "cleanup",
        "delete",
        "save",
    ] {
        let cid = format!("lr-{}", how.len());
        let holder = s.lock_with(&cid, opts(LONG)).await.unwrap();
        let waiter = if how == "finish with a waiter" {
            let (s2, cid2) = (s.clone(), cid.clone());
            let w = tokio::spawn(async move { s2.lock_with(&cid2, opts(LONG)).await });
            queued(s, &cid, 2).await;
            Some(w)
        } else {
            None
        };
        let lost = {
            let started = Instant::now();
            let watching = async {
                holder.lost().await;
                started.elapsed()
            };
            let removing = async {
                // lost() listens first; the removal comes after.
                tokio::time::sleep(Duration::from_millis(100)).await;
                match how {
                    "delete" => s.delete_lock(&cid).await.unwrap(),
                    "save" => s.save_lock(&TicketLock::new(cid.as_str())).await.unwrap(),
                    "cleanup" => s.cleanup(&cid, holder.ticket()).await.unwrap(),
                    _ => s.finish_serving(&cid, holder.ticket()).await.unwrap(),
                }
                futures_pending().await
            };
            tokio::select! {
                took = watching => took,
                _ = removing => unreachable!(),
                _ = tokio::time::sleep(PROMPT) => panic!("{how}: lost() never fired (lease {LONG:?})"),
            }
        };
        assert!(
            lost < Duration::from_millis(100) + PROMPT / 2,
            "{how}: lost() after {lost:?}"
        );
        assert!(!holder.is_held().await.unwrap(), "{how}");
        assert!(
            matches!(holder.release().await, Err(LockError::Expired { .. })),
            "{how}"
        );
        if let Some(w) = waiter {
            let next = served(w, "not served in time").await;
            next.release().await.unwrap();
        }
        s.delete_lock(&cid).await.unwrap();
        f.assert_gone(&cid).await;
    }
}

/// A spawned task's lock result, awaited for at most [`PROMPT`]; `late`
/// says what it means when it takes longer.
async fn served<T>(task: tokio::task::JoinHandle<Result<T, LockError>>, late: &str) -> T {
    tokio::time::timeout(PROMPT, task)
        .await
        .unwrap_or_else(|_| panic!("{late}"))
        .unwrap()
        .unwrap()
}

async fn futures_pending() {
    std::future::pending::<()>().await
}

/// A waiter whose ticket someone removes learns it at once from the store's
/// wake-up, far sooner than its wait time or dead-waiter timeout.
async fn a_removed_waiter_learns_it_within_milliseconds(f: Fixture) {
    let s = &f.store;
    let slow = opts(LONG).with_dead_waiter_timeout(LONG);
    for how in ["finish", "save"] {
        let cid = format!("rm-{how}");
        let holder = s.lock_with(&cid, opts(LONG)).await.unwrap();
        let (s2, cid2) = (s.clone(), cid.clone());
        let waiter = tokio::spawn(async move {
            let result = s2.lock_with(&cid2, slow).await;
            (result, Instant::now())
        });
        queued(s, &cid, 2).await;
        // Let the waiter settle into its wait.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let removed_at = Instant::now();
        match how {
            "finish" => s.finish_serving(&cid, 1).await.unwrap(),
            _ => {
                let mut lock = s.get_lock(&cid).await.unwrap().unwrap();
                lock.remove_ticket_for(1);
                s.save_lock(&lock).await.unwrap();
            }
        }
        let (result, learnt_at) = tokio::time::timeout(PROMPT, waiter)
            .await
            .expect(how)
            .unwrap();
        assert!(
            matches!(result, Err(LockError::Expired { ticket: 1, .. })),
            "{how}: {result:?}"
        );
        let took = learnt_at - removed_at;
        assert!(
            took < Duration::from_millis(250),
            "{how}: learnt after {took:?}"
        );
        // The holder was not disturbed.
        assert!(holder.is_held().await.unwrap(), "{how}");
        holder.release().await.unwrap();
        f.assert_gone(&cid).await;
    }
}

/// A waiter that is granted the lock but dies before picking the grant up
/// (its polls hang) blocks the queue until its lease from the grant ends, not
/// until its dead-waiter timeout, and not until the next waiter's next poll.
async fn a_holder_dead_before_its_pick_up_delays_the_queue_by_its_lease_only(f: Fixture) {
    let s = &f.store;
    let lease = Duration::from_millis(300);
    let holder = s.lock_with("dp", opts(LONG)).await.unwrap();
    // Its first poll goes through (it checks in), every later one hangs.
    let polls = Arc::new(AtomicUsize::new(0));
    let dying = {
        let polls = polls.clone();
        with_faults(s, move |op| match op {
            Op::Poll if polls.fetch_add(1, Ordering::SeqCst) >= 1 => Injected::Hang,
            _ => Injected::Pass,
        })
    };
    let doomed = tokio::spawn(async move {
        dying
            .lock_with("dp", opts(lease).with_dead_waiter_timeout(LONG))
            .await
            .map(std::mem::forget)
    });
    queued(s, "dp", 2).await;
    let s2 = s.clone();
    let next = tokio::spawn(async move {
        let g = s2
            .lock_with("dp", opts(LONG).with_dead_waiter_timeout(LONG))
            .await;
        (g, Instant::now())
    });
    queued(s, "dp", 3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    let (g, served_at) = tokio::time::timeout(PROMPT * 2, next)
        .await
        .expect("the queue stalled")
        .unwrap();
    let waited = served_at - released;
    let g = g.unwrap();
    assert_eq!(g.ticket(), 2);
    assert!(
        waited >= lease - Duration::from_millis(50),
        "served before the dead one's lease ended: {waited:?}"
    );
    assert!(
        waited < lease + Duration::from_millis(700),
        "waited {waited:?} for a {lease:?} lease"
    );
    g.release().await.unwrap();
    doomed.abort();
    s.delete_lock("dp").await.unwrap();
}

/// A holder that shortens its lease tells the waiters, who would otherwise
/// sleep until the end they were told before: if it then dies, the queue
/// moves on when the shorter lease ends.
async fn a_shorter_lease_is_announced_to_the_waiters(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("sh", opts(LONG)).await.unwrap();
    let s2 = s.clone();
    let next = tokio::spawn(async move {
        let g = s2
            .lock_with("sh", opts(LONG).with_dead_waiter_timeout(LONG))
            .await;
        (g, Instant::now())
    });
    queued(s, "sh", 2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let shortened = Instant::now();
    holder.extend(Duration::from_millis(200)).await.unwrap();
    std::mem::forget(holder);
    let (g, served_at) = tokio::time::timeout(PROMPT, next)
        .await
        .expect("the queue stalled")
        .unwrap();
    let waited = served_at - shortened;
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_millis(900),
        "{waited:?}"
    );
    g.unwrap().release().await.unwrap();
    s.delete_lock("sh").await.unwrap();
}

/// `release()` polled once and dropped (a `select!`, a request timeout)
/// still releases: the next `lock` does not wait for the lease.
async fn a_cancelled_release_still_releases(f: Fixture) {
    let s = &f.store;
    for round in 0..3 {
        let holder = s.lock_with("cr", opts(LONG)).await.unwrap();
        let release = holder.release();
        // Poll it once, at most, then drop it.
        let _ = tokio::time::timeout(Duration::ZERO, release).await;
        let started = Instant::now();
        let next = tokio::time::timeout(PROMPT, s.lock_with("cr", opts(LONG)))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the cancelled release kept the lock"))
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "round {round}: {:?}",
            started.elapsed()
        );
        next.release().await.unwrap();
    }
    // A lock_with dropped while it gives its ticket back after its timeout:
    // the waiter behind it is not held up by the given-back ticket.
    let holder = s.lock_with("cr", opts(LONG)).await.unwrap();
    let timed = s.lock_with("cr", opts(LONG).with_timeout(Duration::from_millis(100)));
    let _ = tokio::time::timeout(Duration::from_millis(101), timed).await;
    let s2 = s.clone();
    let behind = tokio::spawn(async move {
        s2.lock_with("cr", opts(LONG).with_dead_waiter_timeout(LONG))
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    holder.release().await.unwrap();
    let g = served(behind, "held up by a dropped give-back").await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    g.release().await.unwrap();
    f.assert_gone("cr").await;
}

/// A release that fails with a retryable error (a blip on the connection)
/// is retried by the store: the caller learns of the failure, and the next
/// waiter is served soon after, not at the end of the lease.
async fn a_retryable_release_failure_is_retried_in_the_background(f: Fixture) {
    let s = &f.store;
    let failed = Arc::new(AtomicUsize::new(0));
    let blip = {
        let failed = failed.clone();
        with_faults(s, move |op| match op {
            Op::Release if failed.fetch_add(1, Ordering::SeqCst) == 0 => Injected::FailBefore,
            _ => Injected::Pass,
        })
    };
    let holder = blip.lock_with("rt", opts(LONG)).await.unwrap();
    let s2 = s.clone();
    let next = tokio::spawn(async move { s2.lock_with("rt", opts(LONG)).await });
    queued(s, "rt", 2).await;
    let started = Instant::now();
    let err = holder.release().await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let g = served(next, "the release was never retried").await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert!(failed.load(Ordering::SeqCst) >= 2, "no second attempt");
    g.release().await.unwrap();
    f.assert_gone("rt").await;
}

/// A grant learnt from a wake-up whose pick-up fails once (a blip at the
/// hand-over) is picked up on a retry: the server keeps the full lease, so
/// nobody else gets in while the guard believes it holds.
async fn a_failed_pick_up_is_retried_and_the_lease_kept(f: Fixture) {
    let s = &f.store;
    let holder = s.lock_with("pu", opts(LONG)).await.unwrap();
    let polls = Arc::new(AtomicUsize::new(0));
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let blip = {
        let (polls, armed) = (polls.clone(), armed.clone());
        // Once armed (at the hand-over), the next poll (the pick-up) fails.
        with_faults(s, move |op| match op {
            Op::Poll => {
                polls.fetch_add(1, Ordering::SeqCst);
                if armed.swap(false, Ordering::SeqCst) {
                    Injected::FailBefore
                } else {
                    Injected::Pass
                }
            }
            _ => Injected::Pass,
        })
    };
    let dead_waiter = Duration::from_millis(400);
    let waiter = tokio::spawn(async move {
        blip.lock_with("pu", opts(LONG).with_dead_waiter_timeout(dead_waiter))
            .await
    });
    queued(s, "pu", 2).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let checked_in = polls.load(Ordering::SeqCst);
    armed.store(true, Ordering::SeqCst);
    holder.release().await.unwrap();
    let g = served(waiter, "not served in time").await;
    // Past the grant's waiting expiry: held only if the pick-up happened.
    tokio::time::sleep(dead_waiter * 2).await;
    let third =
        tokio::time::timeout(Duration::from_millis(200), s.lock_with("pu", opts(LONG))).await;
    assert!(third.is_err(), "someone got in beside the guard");
    assert!(g.is_held().await.unwrap());
    assert!(
        polls.load(Ordering::SeqCst) >= checked_in + 2,
        "the pick-up was not retried"
    );
    g.release().await.unwrap();
    f.assert_gone("pu").await;
}

/// Lua's numbers are doubles: a next number near 2^53 must not make the
/// store hand the same number out twice.
async fn ticket_numbers_stop_below_two_to_the_53(f: Fixture) {
    let s = &f.store;
    let top = (1u64 << 53) - 1;
    let mut lock = TicketLock::new("big");
    let json = serde_json::json!({"conversation_id": "big", "next_number": top, "tickets": []});
    lock = serde_json::from_value(json).unwrap_or(lock);
    s.save_lock(&lock).await.unwrap();
    // save_lock of an empty queue keeps no record: make one first.
    let first = s.issue_ticket("big", LONG).await.unwrap();
    s.finish_serving("big", first).await.unwrap();
    s.save_lock(&lock).await.unwrap();
    assert_eq!(s.issue_ticket("big", LONG).await.unwrap(), top);
    let err = s.issue_ticket("big", LONG).await.unwrap_err();
    assert!(matches!(err, LockError::InvalidInput { .. }), "{err}");
    assert!(err.to_string().contains("every ticket number"), "{err}");
    let err = s.lock("big").await.unwrap_err();
    assert!(matches!(err, LockError::InvalidInput { .. }), "{err}");
    let too_far =
        serde_json::json!({"conversation_id": "big", "next_number": top + 2, "tickets": []});
    let too_far: TicketLock = serde_json::from_value(too_far).unwrap();
    assert!(matches!(
        s.save_lock(&too_far).await,
        Err(LockError::InvalidInput { .. })
    ));
    s.delete_lock("big").await.unwrap();
    f.assert_gone("big").await;
}

/// Grants that follow each other as fast as the store can go (on Redis,
/// often within one microsecond of its clock) still get strictly growing
/// fencing tokens.
async fn fencing_tokens_grow_over_back_to_back_hand_overs(f: Fixture) {
    let s = &f.store;
    let mut fences = Vec::new();
    let mut waiters = Vec::new();
    let holder = s.lock_with("bb", opts(LONG)).await.unwrap();
    fences.push(holder.fencing_token());
    for i in 1..=6u64 {
        waiters.push(s.issue_ticket("bb", LONG).await.unwrap());
        assert_eq!(waiters.last(), Some(&i));
    }
    // Each finish grants the next ticket in the same script run.
    holder.release().await.unwrap();
    for &ticket in &waiters {
        let lock = s.inspect("bb").await.unwrap();
        let record = lock.record.unwrap();
        assert_eq!(record.served, Some(ticket));
        fences.push(record.fence.unwrap());
        s.finish_serving("bb", ticket).await.unwrap();
    }
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
    s.delete_lock("bb").await.unwrap();
    f.assert_gone("bb").await;
}

// ---- Redis-only cases: things the in-memory store cannot have ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_foreign_data_is_reported_and_left_untouched() {
    let f = Fixture::redis(ScriptMode::Auto).await;
    let (mut conn, prefix) = f.raw().await.unwrap();
    let queue = format!("{prefix}{{bad}}");
    let _: () = redis::cmd("SET")
        .arg(&queue)
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    let other = f.store.lock("good").await.unwrap();
    // Every script reads the key first, so each refuses before writing.
    for result in [
        f.store.get_lock("bad").await.map(drop),
        f.store.cleanup("bad", 0).await,
        f.store.issue_ticket("bad", LONG).await.map(drop),
        f.store.lock("bad").await.map(drop),
        f.store.save_lock(&TicketLock::new("bad")).await,
        f.store.delete_lock("bad").await,
        f.store.inspect("bad").await.map(drop),
    ] {
        match result {
            Err(LockError::Corrupted {
                conversation_id,
                detail,
            }) => {
                assert_eq!(conversation_id, "bad");
                // Redis's own WRONGTYPE, or ticketlock's (which names the key).
                assert!(
                    detail.contains("holds a string") || detail.contains("wrong kind of value"),
                    "{detail}"
                );
            }
            other => panic!("expected Corrupted, got {other:?}"),
        }
    }
    // The foreign value is untouched and the other conversation unaffected.
    let value: String = redis::cmd("GET")
        .arg(&queue)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, "not a hash", "a failed script must not have written");
    assert_eq!(
        f.store
            .get_lock("good")
            .await
            .unwrap()
            .unwrap()
            .now_serving(),
        Some(other.ticket())
    );
    other.release().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&queue)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_garbage_in_a_conversations_keys_is_reported_and_contained() {
    let f = Fixture::redis(ScriptMode::Auto).await;
    let (mut conn, prefix) = f.raw().await.unwrap();
    let other = f.store.lock("neighbour").await.unwrap();
    // A v1 record (`next` a number), a field that is not a number, a ticket
    // that does not parse, a record without its fields.
    let garbage: [(&str, &[&str]); 4] = [
        ("HSET", &["{g1}", "next", "3", "epoch", "5"]),
        (
            "HSET",
            &[
                "{g2}", "next", "v2", "n", "1", "e", "5", "h", "0", "s", "0", "f", "12abc", "g",
                "0",
            ],
        ),
        (
            "HSET",
            &[
                "{g3}", "next", "v2", "n", "1", "e", "5", "h", "0", "s", "0", "f", "1", "g", "0",
                "t0", "soon",
            ],
        ),
        ("HSET", &["{g4}", "next", "v2", "e", "5"]),
    ];
    for (i, (cmd, args)) in garbage.iter().enumerate() {
        let cid = format!("g{}", i + 1);
        let mut c = redis::cmd(cmd);
        c.arg(format!("{prefix}{}", args[0])).arg(&args[1..]);
        let _: () = c.query_async(&mut conn).await.unwrap();
        let before: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(format!("{prefix}{}", args[0]))
            .query_async(&mut conn)
            .await
            .unwrap();
        // Reads and removals look at the foreign data as writes do.
        let results = vec![
            f.store.issue_ticket(&cid, LONG).await.map(drop),
            f.store.lock(&cid).await.map(drop),
            f.store.update_lock(&cid).await,
            f.store.cleanup(&cid, 0).await,
            f.store.get_lock(&cid).await.map(drop),
        ];
        for result in results {
            assert!(
                matches!(result, Err(LockError::Corrupted { ref conversation_id, .. }) if *conversation_id == cid),
                "{cid}: {result:?}"
            );
        }
        let after: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(format!("{prefix}{}", args[0]))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            before, after,
            "{cid}: a refusing script must not have written"
        );
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}{{{cid}}}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // The neighbour never noticed.
    let lock = f.store.get_lock("neighbour").await.unwrap().unwrap();
    assert_eq!(lock.now_serving(), Some(other.ticket()));
    other.release().await.unwrap();
    f.assert_gone("neighbour").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_prefixes_isolate_stores_on_one_server() {
    let a = Fixture::redis(ScriptMode::Auto).await;
    let b = Fixture::redis(ScriptMode::Auto).await;
    let default = LockStore::from_url(&support::redis_url()).await.unwrap();
    let ga = a.store.lock("shared-id").await.unwrap();
    let gb = tokio::time::timeout(PROMPT, b.store.lock("shared-id"))
        .await
        .expect("prefixes collide")
        .unwrap();
    assert_eq!((ga.ticket(), gb.ticket()), (0, 0));
    assert_eq!(default.get_lock("shared-id").await.unwrap(), None);
    ga.release().await.unwrap();
    assert!(b.store.get_lock("shared-id").await.unwrap().is_some());
    gb.release().await.unwrap();
    a.assert_gone("shared-id").await;
    b.assert_gone("shared-id").await;
}

/// Uncontended lock + release is two round trips: one EVALSHA each, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_uncontended_lock_and_release_cost_two_round_trips() {
    let server = support::RedisServer::start();
    let store = LockStore::from_url(&server.url()).await.unwrap();
    // Warm up (in Eval mode the first call loads the script: NOSCRIPT, SCRIPT LOAD, retry).
    store.lock("rt").await.unwrap().release().await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    for _ in 0..10 {
        store.lock("rt").await.unwrap().release().await.unwrap();
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let calls = |cmd: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let total: u64 = stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    // Auto mode on Redis 7 runs the Functions library: one FCALL per operation.
    assert_eq!(calls("fcall") + calls("evalsha"), 20, "{stats}");
    // Nothing else reached the server from outside: every other command in
    // the stats ran inside the scripts (data commands), or is this test's own.
    let client_level: u64 = stats
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter(|l| {
            let name = l.split(':').next().unwrap_or("");
            let outside = [
                "fcall",
                "fcall_ro",
                "eval",
                "evalsha",
                "script|",
                "function|",
                "subscribe",
                "ssubscribe",
                "unsubscribe",
                "sunsubscribe",
                "ping",
                "hello",
                "client|",
                "select",
                "multi",
                "exec",
                "get",
                "set",
            ];
            name != "config|resetstat"
                && outside.iter().any(|o| {
                    if o.ends_with('|') {
                        name.starts_with(o)
                    } else {
                        name == *o
                    }
                })
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(client_level, 20, "{stats}");
    let _ = total;
}

/// The Redis backend's futures and handles can cross threads.
#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let store = LockStore::in_memory();
    send_sync(&store);
    send(&store.lock("x"));
    send(&store.lock_with("x", LockOptions::default()));
    send(&store.issue_ticket("x", LONG));
    send(&store.get_lock("x"));
    send(&store.with_lock("x", LockOptions::default(), |_| async {}));
    send(&LockStore::from_url("memory://"));
    fn guard_is_send_sync(g: ticketlock::LockGuard) {
        send_sync(&g);
    }
    let _ = guard_is_send_sync;
    send_sync(&LockError::Expired {
        conversation_id: String::new(),
        ticket: 0,
    });
}
