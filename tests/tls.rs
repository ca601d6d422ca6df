//! TLS with a private CA and client certificates (`ssl_ca_certs`,
//! `ssl_certfile`, `ssl_keyfile`), against real `redis-server --tls-port`
//! processes with throwaway certificates made by the harness (openssl CLI).

mod support;

use std::error::Error as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::{generate_client_cert, generate_tls_certs, RedisServer};
use ticketlock::{LockError, LockOptions, LockStore, StoreConfig};

/// Slack on top of a configured socket timeout before an error must be back.
const MARGIN: Duration = Duration::from_millis(1500);
const SOCKET_TIMEOUT: f64 = 1.0;

/// Waits without polling (30 s between checks): only a push hands over promptly.
fn patient() -> LockOptions {
    LockOptions::default()
        .with_wait_time(Duration::from_secs(30))
        .with_timeout(Duration::from_secs(20))
}

/// `use_ssl` to 127.0.0.1:<port>, trusting `ca`, with a fresh key prefix.
fn tls_config(server: &RedisServer, ca: Option<PathBuf>) -> StoreConfig {
    let mut config = StoreConfig::redis("127.0.0.1");
    config.port = Some(server.port());
    config.use_ssl = true;
    config.ssl_ca_certs = ca;
    config.key_prefix = Some(support::unique_prefix("tls"));
    config.socket_timeout = Some(SOCKET_TIMEOUT);
    config
}

/// A directory for certificates a test makes itself, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("ticketlock-tls-{}", support::unique_prefix("")));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The error's Display, Debug and every source's.
fn everything_shown(e: &LockError) -> String {
    let mut shown = format!("{e}\n{e:?}");
    let mut source = e.source();
    while let Some(s) = source {
        shown.push_str(&format!("\n{s}\n{s:?}"));
        source = s.source();
    }
    shown
}

/// Creating a store from `config` must fail, within the socket timeout
/// (plus slack), with a backend error that is not retryable.
async fn refused(what: &str, config: &StoreConfig) -> LockError {
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(15), LockStore::create(Some(config)))
        .await
        .unwrap_or_else(|_| panic!("{what}: still connecting after 15 s"));
    let took = started.elapsed();
    let e = match outcome {
        Ok(store) => panic!("{what}: connected ({store:?})"),
        Err(e) => e,
    };
    let within = Duration::from_secs_f64(SOCKET_TIMEOUT) + MARGIN;
    assert!(took <= within, "{what}: took {took:?} to fail: {e}");
    assert!(
        matches!(e, LockError::Backend { .. }),
        "{what}: expected a backend error, got {e:?}"
    );
    assert!(
        !e.is_retryable(),
        "{what}: retrying cannot fix this, yet the error says it may: {e:?}"
    );
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_ca_connects_and_a_contended_handoff_works_over_tls() {
    let server = RedisServer::start_tls();
    let ca = server.tls_files().unwrap().ca_cert.clone();
    let config = tls_config(&server, Some(ca.clone()));
    let a = LockStore::create(Some(&config))
        .await
        .expect("TLS with the CA");
    let b = LockStore::create(Some(&config))
        .await
        .expect("TLS with the CA");
    a.lock_with("t", patient())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let mut took = Vec::new();
    for n in 0..5 {
        took.push(support::pushed_handoff(&a, &b, &format!("handoff-{n}")).await);
    }
    println!("TLS hand-offs: {took:?}");
    // Contended: 20 tasks over both stores, one conversation, no overlap.
    let inside = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..20 {
        let s = if n % 2 == 0 { a.clone() } else { b.clone() };
        let inside = inside.clone();
        tasks.push(tokio::spawn(async move {
            let g = s.lock_with("contended", patient()).await.unwrap();
            assert_eq!(inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
            tokio::time::sleep(Duration::from_millis(2)).await;
            inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            g.release().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(a.get_lock("contended").await.unwrap(), None);

    // A rediss:// URL as the host takes the CA file too.
    let mut by_url = StoreConfig::redis(format!("rediss://127.0.0.1:{}/1", server.port()));
    by_url.ssl_ca_certs = Some(ca);
    by_url.key_prefix = config.key_prefix.clone();
    let c = LockStore::create(Some(&by_url))
        .await
        .expect("rediss url + CA");
    support::pushed_handoff(&c, &a, "url").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_fast_with_a_clear_error_that_is_not_retryable() {
    let server = RedisServer::start_tls();
    let other = TempDir::new();
    let other_ca = generate_tls_certs(&other.0).ca_cert;
    let e = refused("another CA", &tls_config(&server, Some(other_ca))).await;
    let shown = everything_shown(&e).to_lowercase();
    println!("with another CA: {e}");
    // Both test CAs have the same name, so rustls finds "the" issuer and
    // rejects its signature: "invalid peer certificate: BadSignature".
    assert!(
        shown.contains("invalid peer certificate"),
        "the error does not say the certificate is not trusted: {e}"
    );
    // The system roots do not know a private CA either.
    let e = refused("system roots", &tls_config(&server, None)).await;
    assert!(
        everything_shown(&e).to_lowercase().contains("certificate"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_verifies_clients_takes_the_client_certificate() {
    let server = RedisServer::start_tls_mutual();
    let files = server.tls_files().unwrap().clone();
    let client = server.client_cert().unwrap().clone();

    // Without a client certificate: refused, clearly and for good.
    let e = refused(
        "no client certificate",
        &tls_config(&server, Some(files.ca_cert.clone())),
    )
    .await;
    println!("without a client certificate: {e}");
    let shown = everything_shown(&e).to_lowercase();
    assert!(shown.contains("certificate"), "{e}");

    // With one (key in its own file, or in the same PEM): connects and hands over.
    let mut with_cert = tls_config(&server, Some(files.ca_cert.clone()));
    with_cert.ssl_certfile = Some(client.cert.clone());
    with_cert.ssl_keyfile = Some(client.key.clone());
    let a = LockStore::create(Some(&with_cert))
        .await
        .expect("client certificate and key");
    let mut combined = tls_config(&server, Some(files.ca_cert.clone()));
    combined.key_prefix = with_cert.key_prefix.clone();
    combined.ssl_certfile = Some(client.combined.clone());
    let b = LockStore::create(Some(&combined))
        .await
        .expect("certificate and key in one PEM");
    let took = support::pushed_handoff(&a, &b, "mutual").await;
    println!("mutual-TLS hand-off: {took:?}");

    // A certificate from a CA the server does not trust: refused.
    let other = TempDir::new();
    let stranger_ca = generate_tls_certs(&other.0);
    let stranger = generate_client_cert(&other.0, &stranger_ca);
    let mut foreign = tls_config(&server, Some(files.ca_cert.clone()));
    foreign.ssl_certfile = Some(stranger.cert);
    foreign.ssl_keyfile = Some(stranger.key);
    refused("a client certificate of another CA", &foreign).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_that_cannot_be_used_are_configuration_errors() {
    let dir = TempDir::new();
    let files = generate_tls_certs(&dir.0);
    let not_pem = dir.0.join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    // Nothing listens on port 1: each case must fail before connecting.
    let base = || {
        let mut c = StoreConfig::redis("127.0.0.1");
        c.port = Some(1);
        c.use_ssl = true;
        c
    };
    let cases: Vec<(&str, StoreConfig)> = vec![
        ("missing CA file", {
            let mut c = base();
            c.ssl_ca_certs = Some(dir.0.join("nope.pem"));
            c
        }),
        ("CA file without a certificate", {
            let mut c = base();
            c.ssl_ca_certs = Some(not_pem.clone());
            c
        }),
        ("key without certificate", {
            let mut c = base();
            c.ssl_keyfile = Some(files.key.clone());
            c
        }),
        ("certificate without a key", {
            let mut c = base();
            c.ssl_certfile = Some(files.cert.clone());
            c
        }),
        ("TLS files without TLS", {
            let mut c = base();
            c.use_ssl = false;
            c.ssl_ca_certs = Some(files.ca_cert.clone());
            c
        }),
    ];
    for (what, config) in cases {
        let started = Instant::now();
        match LockStore::create(Some(&config)).await {
            Err(e @ LockError::InvalidInput { .. }) => {
                assert!(!e.is_retryable(), "{what}: {e}");
                assert!(started.elapsed() < Duration::from_millis(500), "{what}");
            }
            Err(e) => panic!("{what}: expected InvalidInput, got {e:?}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_with_a_private_ca_locks_and_hands_over_on_every_shard() {
    let cluster = support::RedisCluster::start_tls(3);
    let ca = cluster.tls_files().unwrap().ca_cert.clone();
    let prefix = support::unique_prefix("tlsc");
    // deployment_mode + endpoints + use_ssl, and a rediss+cluster:// URL as host.
    let mut by_endpoints = StoreConfig::redis("127.0.0.1");
    by_endpoints.deployment_mode = ticketlock::DeploymentMode::Cluster;
    by_endpoints.endpoints = cluster.endpoints();
    by_endpoints.use_ssl = true;
    by_endpoints.ssl_ca_certs = Some(ca.clone());
    by_endpoints.key_prefix = Some(prefix.clone());
    let mut by_url = StoreConfig::redis(cluster.url());
    by_url.ssl_ca_certs = Some(ca);
    by_url.key_prefix = Some(prefix.clone());
    let a = LockStore::create(Some(&by_endpoints))
        .await
        .expect("TLS cluster by endpoints");
    let b = LockStore::create(Some(&by_url))
        .await
        .expect("TLS cluster by rediss+cluster url");
    // One id per node.
    let mut ids = std::collections::BTreeMap::new();
    for n in 0.. {
        let id = format!("c{n}");
        let port = cluster.port_for_key(&format!("{prefix}:lock:{{{id}}}"));
        ids.entry(port).or_insert(id);
        if ids.len() == 3 {
            break;
        }
    }
    let mut took = Vec::new();
    for id in ids.values() {
        took.push(support::pushed_handoff(&a, &b, id).await);
    }
    println!("TLS cluster hand-offs (one per shard): {took:?}");
    // Without the CA: refused, and not retryable.
    let mut untrusted = by_endpoints.clone();
    untrusted.ssl_ca_certs = None;
    untrusted.socket_timeout = Some(SOCKET_TIMEOUT);
    refused("TLS cluster, system roots", &untrusted).await;
}
