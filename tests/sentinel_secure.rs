//! Sentinels that want a password and speak TLS only, in front of data
//! nodes that do the same (one CA): the store reaches them through
//! `sentinel_password` / `sentinel_use_ssl` and the shared `ssl_ca_certs`,
//! and follows a failover. (The conformance suite runs every case on such a
//! deployment too: `tests/conformance.rs`, `on_secure_sentinel`.)

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{wait_for, SecureSentinelDeployment, SECURE_DATA_PASSWORD, SECURE_SENTINEL_PASSWORD};
use ticketlock::{DeploymentMode, LockError, LockOptions, LockStore, StoreConfig};

const SERVICE: &str = "mymaster";
const PROMPT: Duration = Duration::from_secs(2);

/// A sentinel config for `d`: credentials and TLS on both hops.
fn config(d: &SecureSentinelDeployment) -> StoreConfig {
    let mut config = StoreConfig::redis("127.0.0.1");
    config.deployment_mode = DeploymentMode::Sentinel;
    config.endpoints = vec![d.sentinel.endpoint()];
    config.sentinel_service = Some(SERVICE.to_owned());
    config.password = Some(SECURE_DATA_PASSWORD.to_owned());
    config.use_ssl = true;
    config.ssl_ca_certs = Some(d.tls.ca_cert.clone());
    config.sentinel_password = Some(SECURE_SENTINEL_PASSWORD.to_owned());
    config.sentinel_use_ssl = true;
    config.key_prefix = Some(support::unique_prefix("ssent"));
    config.socket_timeout = Some(2.0);
    config
}

fn patient() -> LockOptions {
    LockOptions::default()
        .with_wait_time(Duration::from_secs(30))
        .with_timeout(Duration::from_secs(20))
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [SECURE_DATA_PASSWORD, SECURE_SENTINEL_PASSWORD] {
        assert!(!text.contains(secret), "{what} shows a password: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reaches_sentinels_that_want_a_password_and_tls() {
    let d = SecureSentinelDeployment::start(SERVICE);
    let config = config(&d);
    assert_no_secret("Debug", &format!("{config:?}"));
    assert_no_secret("Display", &config.to_string());
    let prefix = config.key_prefix.clone().unwrap();
    let a = LockStore::create(Some(&config)).await.expect("connect");
    let b = LockStore::create(Some(&config)).await.expect("connect");
    let guard = a.lock_with("s1", patient()).await.expect("lock");
    let key = format!("{prefix}:lock:{{s1}}");
    assert_eq!(
        d.data_cli(d.master.port(), &["-n", "1", "EXISTS", &key]),
        "1"
    );
    guard.release().await.expect("release");
    let took = support::pushed_handoff(&a, &b, "s2").await;
    assert!(took < PROMPT, "hand-off took {took:?}");

    // The URL form for the data nodes, the sentinel settings as fields.
    let mut by_url = StoreConfig::from_url(&format!(
        "rediss+sentinel://:{SECURE_DATA_PASSWORD}@{}/{SERVICE}/2",
        d.sentinel.endpoint()
    ))
    .expect("url");
    by_url.ssl_ca_certs = Some(d.tls.ca_cert.clone());
    by_url.sentinel_password = Some(SECURE_SENTINEL_PASSWORD.to_owned());
    by_url.sentinel_use_ssl = true;
    by_url.key_prefix = Some(prefix.clone());
    let store = LockStore::create(Some(&by_url)).await.expect("url form");
    store.lock("s3").await.unwrap().release().await.unwrap();

    // Each missing piece is a clear error within the timeout, without secrets.
    let mut no_password = config.clone();
    no_password.sentinel_password = None;
    let mut wrong_password = config.clone();
    wrong_password.sentinel_password = Some("not-it".into());
    let mut plain = config.clone();
    plain.sentinel_use_ssl = false;
    for (what, broken) in [
        ("no sentinel password", no_password),
        ("a wrong sentinel password", wrong_password),
        ("plain text to TLS sentinels", plain),
    ] {
        let started = Instant::now();
        let e = LockStore::create(Some(&broken)).await.expect_err(what);
        println!("{what}: {e} after {:?}", started.elapsed());
        assert!(matches!(e, LockError::Backend { .. }), "{what}: {e:?}");
        assert!(started.elapsed() < Duration::from_secs(2) + Duration::from_secs(1));
        assert_no_secret(what, &format!("{e} {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_behind_secure_sentinels_costs_only_retryable_errors() {
    let d = SecureSentinelDeployment::start(SERVICE);
    let config = config(&d);
    let stores = [
        LockStore::create(Some(&config)).await.expect("connect"),
        LockStore::create(Some(&config)).await.expect("connect"),
    ];
    // Two workers per store, one conversation each pair: lock, bump, release.
    let stop = Arc::new(AtomicBool::new(false));
    let sections = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<Vec<LockError>>> = Arc::default();
    let inside: [Arc<AtomicUsize>; 2] = Default::default();
    let mut workers = Vec::new();
    for i in 0..4 {
        // Workers 0 and 1 share conversation busy-0 (through the two
        // stores), 2 and 3 busy-1.
        let store = stores[i % 2].clone();
        let (stop, sections, overlaps, errors) = (
            stop.clone(),
            sections.clone(),
            overlaps.clone(),
            errors.clone(),
        );
        let inside = inside[i / 2].clone();
        workers.push(tokio::spawn(async move {
            let cid = format!("busy-{}", i / 2);
            while !stop.load(Ordering::Relaxed) {
                match store.lock_with(&cid, patient()).await {
                    Ok(guard) => {
                        if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        sections.fetch_add(1, Ordering::SeqCst);
                        if let Err(e) = guard.release().await {
                            errors.lock().unwrap().push(e);
                        }
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = sections.load(Ordering::SeqCst);
    assert!(
        before > 10,
        "only {before} critical sections before the failover"
    );

    let failover_at = Instant::now();
    d.failover(Duration::from_secs(20));
    wait_for(
        "the sentinel names the replica",
        Duration::from_secs(20),
        || match d.master_port() {
            Some(p) if p == d.replica.port() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let switched = sections.load(Ordering::SeqCst);
    wait_for("serving again", Duration::from_secs(60), || {
        let now = sections.load(Ordering::SeqCst);
        if now > switched + 30 {
            Ok(())
        } else {
            Err(format!("{now} sections"))
        }
    });
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    println!(
        "secure sentinel failover: {} sections ({before} before), {} errors in {:?}",
        sections.load(Ordering::SeqCst),
        errors.len(),
        failover_at.elapsed()
    );
    for e in &errors {
        assert!(
            e.is_retryable(),
            "a failover error that is not retryable: {e:?}"
        );
        assert_no_secret("a failover error", &format!("{e} {e:?}"));
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0);

    // The same stores, on the new master, hand over by push.
    let took = support::pushed_handoff(&stores[0], &stores[1], "after").await;
    assert!(took < PROMPT, "hand-off took {took:?}");
    let guard = stores[0].lock("where").await.unwrap();
    let key = format!("{}:lock:{{where}}", config.key_prefix.as_deref().unwrap());
    assert_eq!(
        d.data_cli(d.replica.port(), &["-n", "1", "EXISTS", &key]),
        "1",
        "the record is not on the promoted replica"
    );
    guard.release().await.unwrap();
}
