//! A real Redis Cluster: 3 masters on 127.0.0.1 (`support::RedisCluster`,
//! shared by the tests of this binary, each test under its own key prefix).
//!
//! Scripts run on the shard that owns a conversation's keys, wake-ups travel
//! by sharded pub/sub on that shard, and conversations spread over every
//! shard stay exclusive, also between separate OS processes (the
//! `participant` example, as in tests/faults.rs).

mod support;

use std::collections::{BTreeMap, BTreeSet};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{redis_cli, shared_cluster, RedisCluster, RedisServer};
use ticketlock::{DeploymentMode, LockError, LockOptions, LockStore, ScriptMode, StoreConfig};

/// A hand-off that rides a push takes milliseconds; the waiter's own poll is
/// 30 s away (see [`patient`]), so anything under this was pushed.
const PROMPT: Duration = Duration::from_secs(2);

/// Waits without polling (30 s between checks), so only a pushed wake-up can
/// hand the lock over promptly; never waits more than 20 s in all.
fn patient() -> LockOptions {
    LockOptions::default()
        .with_wait_time(Duration::from_secs(30))
        .with_timeout(Duration::from_secs(20))
}

/// A cluster config (startup nodes in `endpoints`) with its own key prefix.
fn config(cluster: &RedisCluster, prefix: &str, mode: ScriptMode) -> StoreConfig {
    let mut config = StoreConfig::redis("127.0.0.1");
    config.deployment_mode = DeploymentMode::Cluster;
    config.endpoints = cluster.endpoints();
    config.key_prefix = Some(prefix.to_owned());
    config.script_mode = mode;
    config
}

async fn store(cluster: &RedisCluster, prefix: &str, mode: ScriptMode) -> LockStore {
    LockStore::create(Some(&config(cluster, prefix, mode)))
        .await
        .expect("connect to the cluster")
}

/// The meta key (and wake-up channel) of `cid` under `prefix`.
fn meta(prefix: &str, cid: &str) -> String {
    format!("{prefix}:lock:{{{cid}}}")
}

/// Every key under `prefix` on every node, as (port, key).
fn keys_everywhere(cluster: &RedisCluster, prefix: &str) -> Vec<(u16, String)> {
    let pattern = format!("{prefix}:*");
    cluster
        .ports()
        .into_iter()
        .flat_map(|port| {
            redis_cli(port, &["KEYS", &pattern])
                .lines()
                .filter(|l| !l.is_empty())
                .map(|k| (port, k.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Conversation ids, `per_node` for each node, found by asking `CLUSTER
/// KEYSLOT` where their keys land (the hash tag is the id).
fn ids_on_every_node(cluster: &RedisCluster, prefix: &str, per_node: usize) -> Vec<String> {
    let mut by_port: BTreeMap<u16, Vec<String>> = cluster
        .ports()
        .into_iter()
        .map(|p| (p, Vec::new()))
        .collect();
    for n in 0.. {
        if by_port.values().all(|ids| ids.len() >= per_node) {
            break;
        }
        assert!(n < 10_000, "no spread over the nodes: {by_port:?}");
        let id = format!("conv-{n}");
        let port = cluster.port_for_key(&meta(prefix, &id));
        let ids = by_port.get_mut(&port).expect("a node of ours");
        if ids.len() < per_node {
            ids.push(id);
        }
    }
    by_port.into_values().flatten().collect()
}

async fn lock_and_release(store: &LockStore, cid: &str) -> Result<(), LockError> {
    store.lock_with(cid, patient()).await?.release().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_url_and_config_form_reaches_the_cluster() {
    let cluster = shared_cluster();
    let prefix = support::unique_prefix("forms");
    let endpoints = cluster.endpoints();
    // The URL form (a prefix needs a config, so this one uses the default prefix
    // and an id no other test uses).
    let by_url = LockStore::from_url(&cluster.url())
        .await
        .expect("redis+cluster:// url");
    let cid = format!("{prefix}-url");
    lock_and_release(&by_url, &cid)
        .await
        .expect("lock via the url");
    assert_eq!(by_url.get_lock(&cid).await.unwrap(), None);
    // One startup node is enough: the client learns the others.
    let mut one = StoreConfig::redis(format!("redis+cluster://{}", endpoints[2]));
    one.key_prefix = Some(prefix.clone());
    let one = LockStore::create(Some(&one))
        .await
        .expect("one startup node");
    // deployment_mode + endpoints, and deployment_mode + a plain URL as host.
    let by_endpoints = store(cluster, &prefix, ScriptMode::Auto).await;
    let mut by_host = StoreConfig::redis(format!("redis://{}", endpoints[1]));
    by_host.deployment_mode = DeploymentMode::Cluster;
    by_host.key_prefix = Some(prefix.clone());
    let by_host = LockStore::create(Some(&by_host))
        .await
        .expect("cluster host url");
    for (i, s) in [&one, &by_endpoints, &by_host].into_iter().enumerate() {
        lock_and_release(s, &format!("form-{i}"))
            .await
            .expect("lock");
    }
    // They share the queues.
    let held = one.lock_with("shared", patient()).await.unwrap();
    assert_eq!(
        by_host
            .get_lock("shared")
            .await
            .unwrap()
            .unwrap()
            .now_serving(),
        Some(held.ticket())
    );
    held.release().await.unwrap();
    assert!(keys_everywhere(cluster, &prefix).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_from_two_stores_are_served_in_ticket_order() {
    let cluster = shared_cluster();
    let prefix = support::unique_prefix("fifo");
    // One store runs the Functions library, the other EVALSHA: same queues.
    let a = store(cluster, &prefix, ScriptMode::Functions).await;
    let b = store(cluster, &prefix, ScriptMode::Eval).await;
    for cid in ids_on_every_node(cluster, &prefix, 1) {
        let holder = a.lock_with(&cid, patient()).await.unwrap();
        assert_eq!(holder.ticket(), 0);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..6u64 {
            let s = if i % 2 == 0 { b.clone() } else { a.clone() };
            let (order, cid2) = (order.clone(), cid.clone());
            waiters.push(tokio::spawn(async move {
                let g = s.lock_with(&cid2, patient()).await.unwrap();
                order.lock().unwrap().push(g.ticket());
                tokio::time::sleep(Duration::from_millis(5)).await;
                g.release().await.unwrap();
            }));
            // Queue them one by one, so ticket i + 1 belongs to waiter i.
            let deadline = Instant::now() + Duration::from_secs(5);
            while a.get_lock(&cid).await.unwrap().unwrap().tickets().len() < i as usize + 2 {
                assert!(Instant::now() < deadline, "waiter {i} never queued");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        holder.release().await.unwrap();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("the queue stalled")
                .unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 2, 3, 4, 5, 6], "{cid}");
        assert_eq!(a.get_lock(&cid).await.unwrap(), None);
    }
    assert!(keys_everywhere(cluster, &prefix).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_pushed_by_sharded_pub_sub_on_the_conversations_shard() {
    let cluster = shared_cluster();
    let prefix = support::unique_prefix("push");
    let a = store(cluster, &prefix, ScriptMode::Auto).await;
    let b = store(cluster, &prefix, ScriptMode::Eval).await;
    let ids = ids_on_every_node(cluster, &prefix, 1);

    // While a waiter sleeps, its channel is a shard channel on the owning
    // node only, and no classic channel exists anywhere.
    let cid = &ids[0];
    let channel = meta(&prefix, cid);
    let owner = cluster.port_for_key(&channel);
    let held = a.lock_with(cid, patient()).await.unwrap();
    let waiter = {
        let b = b.clone();
        let cid = cid.clone();
        tokio::spawn(async move { b.lock_with(&cid, patient()).await })
    };
    support::wait_for("the waiter subscribed", Duration::from_secs(5), || {
        let shard = redis_cli(owner, &["PUBSUB", "SHARDCHANNELS", &channel]);
        if shard == channel {
            Ok(())
        } else {
            Err(shard)
        }
    });
    for port in cluster.ports() {
        let classic = redis_cli(port, &["PUBSUB", "CHANNELS", &format!("{prefix}*")]);
        assert!(classic.is_empty(), "classic channels on {port}: {classic}");
        if port != owner {
            let shard = redis_cli(port, &["PUBSUB", "SHARDCHANNELS", &format!("{prefix}*")]);
            assert!(
                shard.is_empty(),
                "shard channels on {port}, not the owner: {shard}"
            );
        }
    }
    held.release().await.unwrap();
    tokio::time::timeout(PROMPT, waiter)
        .await
        .expect("no pushed hand-off")
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();

    // Hand-offs on every shard, 10 each, all pushed.
    let mut took = Vec::new();
    for cid in &ids {
        for _ in 0..10 {
            took.push(support::pushed_handoff(&a, &b, cid).await);
        }
    }
    took.sort();
    let median = took[took.len() / 2];
    let max = *took.last().unwrap();
    println!(
        "cluster hand-off over {} releases on 3 shards: median {median:?}, max {max:?}",
        took.len()
    );
    assert!(max < PROMPT, "a hand-off took {max:?}: not pushed");
    // The last listener left: no subscription stays behind.
    support::wait_for("subscriptions gone", Duration::from_secs(5), || {
        let left: String = cluster
            .ports()
            .into_iter()
            .map(|p| redis_cli(p, &["PUBSUB", "SHARDCHANNELS", &format!("{prefix}*")]))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(left)
        }
    });
    assert!(keys_everywhere(cluster, &prefix).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_live_on_the_owning_shard_with_ttls_and_vanish_after_release() {
    let cluster = shared_cluster();
    let prefix = support::unique_prefix("keys");
    let s = store(cluster, &prefix, ScriptMode::Auto).await;
    let ids = ids_on_every_node(cluster, &prefix, 1);
    let lifetime = Duration::from_secs(30);
    let mut guards = Vec::new();
    for cid in &ids {
        guards.push(
            s.lock_with(cid, patient().with_lifetime(lifetime))
                .await
                .unwrap(),
        );
        s.issue_ticket(cid, lifetime).await.unwrap();
    }
    let keys = keys_everywhere(cluster, &prefix);
    assert_eq!(keys.len(), ids.len(), "one key per conversation: {keys:?}");
    let owners: BTreeSet<u16> = keys.iter().map(|(port, _)| *port).collect();
    assert_eq!(owners.len(), 3, "keys on {owners:?}");
    for (port, key) in &keys {
        let tag = key
            .split('{')
            .nth(1)
            .and_then(|r| r.split('}').next())
            .unwrap();
        assert_eq!(
            *port,
            cluster.port_for_key(&meta(&prefix, tag)),
            "{key} is not on its conversation's shard"
        );
        let ttl: i64 = redis_cli(*port, &["PTTL", key]).parse().unwrap();
        assert!(
            ttl > 0 && ttl <= lifetime.as_millis() as i64 + 1000,
            "{key} has TTL {ttl}"
        );
    }
    for (cid, g) in ids.iter().zip(guards) {
        g.release().await.unwrap();
        let next = s
            .get_lock(cid)
            .await
            .unwrap()
            .unwrap()
            .now_serving()
            .unwrap();
        s.cleanup(cid, next).await.unwrap();
    }
    let left = keys_everywhere(cluster, &prefix);
    assert!(left.is_empty(), "keys left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_spread_over_all_three_shards_stay_exclusive() {
    let cluster = shared_cluster();
    let prefix = support::unique_prefix("excl");
    let stores = [
        store(cluster, &prefix, ScriptMode::Auto).await,
        store(cluster, &prefix, ScriptMode::Eval).await,
    ];
    let ids = ids_on_every_node(cluster, &prefix, 2);
    let shards: BTreeSet<u16> = ids
        .iter()
        .map(|cid| cluster.port_for_key(&meta(&prefix, cid)))
        .collect();
    assert_eq!(shards.len(), 3, "ids {ids:?} land on {shards:?}");

    const TASKS_PER_ID: usize = 4;
    const ROUNDS: usize = 10;
    let inside: Arc<Vec<AtomicUsize>> = Arc::new(ids.iter().map(|_| AtomicUsize::new(0)).collect());
    let counters: Arc<Vec<AtomicUsize>> =
        Arc::new(ids.iter().map(|_| AtomicUsize::new(0)).collect());
    let overlaps = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, cid) in ids.iter().enumerate() {
        for t in 0..TASKS_PER_ID {
            let s = stores[t % 2].clone();
            let (cid, inside, counters, overlaps) = (
                cid.clone(),
                inside.clone(),
                counters.clone(),
                overlaps.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut fences = Vec::new();
                for _ in 0..ROUNDS {
                    let g = s.lock_with(&cid, patient()).await.unwrap();
                    fences.push(g.fencing_token());
                    if inside[i].fetch_add(1, Ordering::SeqCst) != 0 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    // A deliberately non-atomic read-modify-write.
                    let read = counters[i].load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    counters[i].store(read + 1, Ordering::SeqCst);
                    inside[i].fetch_sub(1, Ordering::SeqCst);
                    g.release().await.unwrap();
                }
                fences
            }));
        }
    }
    let mut fences_per_id: Vec<Vec<u64>> = vec![Vec::new(); ids.len()];
    for (n, t) in tasks.into_iter().enumerate() {
        let fences = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the run stalled")
            .unwrap();
        // Each task's own grants come in fence order.
        assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
        fences_per_id[n / TASKS_PER_ID].extend(fences);
    }
    let took = started.elapsed();
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    for (i, cid) in ids.iter().enumerate() {
        assert_eq!(
            counters[i].load(Ordering::SeqCst),
            TASKS_PER_ID * ROUNDS,
            "lost updates on {cid}"
        );
        // Every grant of a conversation had its own fencing token.
        let mut f = fences_per_id[i].clone();
        f.sort_unstable();
        f.dedup();
        assert_eq!(f.len(), TASKS_PER_ID * ROUNDS, "{cid}");
    }
    let sections = ids.len() * TASKS_PER_ID * ROUNDS;
    println!(
        "cluster exclusion: {sections} critical sections on {} conversations over 3 shards in {took:?} ({:.0}/s)",
        ids.len(),
        sections as f64 / took.as_secs_f64()
    );
    let left = keys_everywhere(cluster, &prefix);
    assert!(left.is_empty(), "keys left behind: {left:?}");
}

/// The issue's multi-process exclusion test on a real 3-master cluster: 4
/// participant processes (`--redis redis+cluster://...`) each run 30
/// critical sections on each of 3 conversations, one per shard, all at once.
/// Each section logs its grant, does a deliberately non-atomic GET-then-SET
/// of the conversation's counter (a key with the conversation's hash tag, so
/// on its shard), and logs its release. No update is lost, every
/// conversation's log is a sequence of disjoint sections (each grant is
/// followed by its own release) with strictly increasing fencing tokens, and
/// no key of the prefix is left on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_on_three_shards_lose_no_update_and_fence_in_order() {
    // The build may wait for other cargo processes: before any clock starts.
    tokio::task::block_in_place(|| {
        support::example_binary("participant");
    });
    let cluster = shared_cluster();
    let prefix = support::unique_prefix("mproc");
    let ids = ids_on_every_node(cluster, &prefix, 1);
    const PROCESSES: usize = 4;
    const SECTIONS: usize = 30;
    let log_key = |cid: &str| support::section_log_key(&prefix, cid);
    let counter_key = |cid: &str| support::section_counter_key(&prefix, cid);
    // One conversation per shard, and its log and counter on that shard too.
    let owners: BTreeMap<&str, u16> = ids
        .iter()
        .map(|cid| (cid.as_str(), cluster.port_for_key(&meta(&prefix, cid))))
        .collect();
    assert_eq!(
        owners.values().collect::<BTreeSet<_>>().len(),
        3,
        "{owners:?}"
    );
    for (cid, &port) in &owners {
        assert_eq!(cluster.port_for_key(&log_key(cid)), port, "{cid}");
        assert_eq!(cluster.port_for_key(&counter_key(cid)), port, "{cid}");
    }

    let url = cluster.url();
    let started = Instant::now();
    let children = support::spawn_loopers(
        PROCESSES,
        &url,
        &prefix,
        &ids,
        SECTIONS,
        &["--hold-ms", "1", "--lifetime-ms", "15000"],
    );
    let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    let transcripts =
        support::finish_all(children, Duration::from_secs(110), ids.len() * SECTIONS).await;
    // A failed call (retried) or a lost lease shows up here.
    let retries = transcripts
        .iter()
        .flatten()
        .filter(|l| l.starts_with("error ") || l.starts_with("expired "))
        .count();
    let took = started.elapsed();

    // Consecutive sections of a conversation held by different processes.
    let mut switches = 0;
    for (cid, &port) in &owners {
        let counter = redis_cli(port, &["GET", &counter_key(cid)]);
        assert_eq!(
            counter,
            (PROCESSES * SECTIONS).to_string(),
            "lost updates on {cid} (shard {port})"
        );
        let log = redis_cli(port, &["LRANGE", &log_key(cid), "0", "-1"]);
        let sections = support::disjoint_sections(cid, &log);
        assert_eq!(sections.len(), PROCESSES * SECTIONS, "{cid}: {log}");
        let mut per_pid: BTreeMap<u32, usize> = BTreeMap::new();
        for pair in sections.windows(2) {
            if pair[0].pid != pair[1].pid {
                switches += 1;
            }
        }
        for section in &sections {
            *per_pid.entry(section.pid).or_default() += 1;
        }
        assert_eq!(
            per_pid.keys().copied().collect::<BTreeSet<_>>(),
            pids.iter().copied().collect::<BTreeSet<_>>(),
            "{cid}"
        );
        assert!(per_pid.values().all(|&n| n == SECTIONS), "{per_pid:?}");
        assert_eq!(
            redis_cli(port, &["DEL", &counter_key(cid), &log_key(cid)]),
            "2"
        );
    }
    let sections = PROCESSES * ids.len() * SECTIONS;
    println!(
        "cluster, {PROCESSES} processes: {sections} critical sections on {} conversations over 3 shards in {took:?} ({:.0}/s), {switches} hand-overs between processes, {retries} retried calls or lost leases",
        ids.len(),
        sections as f64 / took.as_secs_f64()
    );
    let left = keys_everywhere(cluster, &prefix);
    assert!(left.is_empty(), "keys left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_and_the_library_reach_every_shard_and_come_back_after_a_flush() {
    // A cluster of its own: this test flushes scripts and functions.
    let cluster = RedisCluster::start(3);
    let prefix = support::unique_prefix("flush");
    let functions = store(&cluster, &prefix, ScriptMode::Functions).await;
    let eval = store(&cluster, &prefix, ScriptMode::Eval).await;
    let ids = ids_on_every_node(&cluster, &prefix, 1);
    // FUNCTION LOAD went to every primary, as the sharded library.
    for port in cluster.ports() {
        let libs = redis_cli(port, &["FUNCTION", "LIST", "LIBRARYNAME", "ticketlock*"]);
        assert!(libs.contains("ticketlock_v2s"), "node {port}: {libs}");
        assert!(
            !libs.lines().any(|l| l.trim() == "ticketlock_v2"),
            "node {port} has the classic library: {libs}"
        );
    }
    for round in 0..2 {
        for cid in &ids {
            lock_and_release(&functions, cid).await.expect("functions");
            lock_and_release(&eval, cid).await.expect("eval");
            support::pushed_handoff(&functions, &eval, cid).await;
        }
        if round == 0 {
            // Every node forgets: the next calls reload on the node that ran them.
            for port in cluster.ports() {
                assert_eq!(redis_cli(port, &["FUNCTION", "FLUSH"]), "OK");
                assert_eq!(redis_cli(port, &["SCRIPT", "FLUSH"]), "OK");
            }
        }
    }
    assert!(keys_everywhere(&cluster, &prefix).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_a_retryable_error_within_the_socket_timeout() {
    // A port that was just free: nothing listens there.
    let port = RedisServer::start().port();
    let mut config = StoreConfig::redis("127.0.0.1");
    config.deployment_mode = DeploymentMode::Cluster;
    config.endpoints = vec![format!("127.0.0.1:{port}")];
    config.socket_timeout = Some(1.0);
    let started = Instant::now();
    let e = LockStore::create(Some(&config)).await.unwrap_err();
    let took = started.elapsed();
    println!("unreachable cluster: {e} after {took:?}");
    assert!(matches!(e, LockError::Backend { .. }), "{e:?}");
    assert!(e.is_retryable(), "{e:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // A plain (non-cluster) server is no cluster: a clear error.
    let plain = RedisServer::start();
    config.endpoints = vec![format!("127.0.0.1:{}", plain.port())];
    let e = LockStore::create(Some(&config)).await.unwrap_err();
    println!("not a cluster: {e}");
    assert!(matches!(e, LockError::Backend { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_cluster_takes_the_password_and_refuses_a_wrong_one() {
    let cluster = RedisCluster::start(3);
    let prefix = support::unique_prefix("auth");
    // Where the ids land, asked before the nodes want a password.
    let ids = ids_on_every_node(&cluster, &prefix, 1);
    for port in cluster.ports() {
        assert_eq!(
            redis_cli(port, &["CONFIG", "SET", "requirepass", "s3cret"]),
            "OK"
        );
    }
    let mut good = config(&cluster, &prefix, ScriptMode::Auto);
    good.password = Some("s3cret".into());
    let s = LockStore::create(Some(&good))
        .await
        .expect("the right password");
    for cid in &ids {
        lock_and_release(&s, cid)
            .await
            .expect("lock with the password");
    }
    let by_url = LockStore::from_url(&format!(
        "redis+cluster://:s3cret@{}",
        cluster.endpoints().join(",")
    ))
    .await
    .expect("password in the url");
    lock_and_release(&by_url, &format!("{prefix}-url"))
        .await
        .unwrap();

    let mut wrong = good.clone();
    wrong.password = Some("wr0ngpass".into());
    wrong.socket_timeout = Some(1.0);
    let started = Instant::now();
    let e = LockStore::create(Some(&wrong)).await.unwrap_err();
    println!("wrong cluster password: {e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(e, LockError::Backend { .. }), "{e:?}");
    assert!(
        !e.is_retryable(),
        "a wrong password is not retryable: {e:?}"
    );
    assert!(!format!("{e:?}").contains("wr0ngpass"), "{e:?}");
}
