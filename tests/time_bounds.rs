//! `socket_timeout` bounds connecting (TLS handshake included) and every
//! call, whatever the server does: a silent one (accepts, never answers), a
//! stalled one (SIGSTOP), a plain one spoken to in TLS, a TLS one spoken to
//! in plain text. The last two also say what is likely wrong.

mod support;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use support::RedisServer;
use ticketlock::{LockError, LockOptions, LockStore, StoreConfig};

/// Slack on top of the socket timeout: scheduling on a busy 2-vCPU machine.
const SLACK: Duration = Duration::from_secs(1);

/// A port that accepts connections and never says a word (until dropped).
struct Silent {
    port: u16,
    _listener: TcpListener,
}

impl Silent {
    fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        let port = listener.local_addr().expect("its address").port();
        // Never accepted: the kernel completes the handshake (backlog), and
        // the client's bytes are never read.
        Silent {
            port,
            _listener: listener,
        }
    }
}

fn config(url: &str, timeout: f64) -> StoreConfig {
    let mut config = StoreConfig::from_url(url).expect("a valid url");
    config.socket_timeout = Some(timeout);
    config
}

/// Creating the store fails with a `Backend` error within `limit`.
async fn refused_within(url: &str, timeout: f64, limit: Duration) -> LockError {
    let started = Instant::now();
    let result = LockStore::create(Some(&config(url, timeout))).await;
    let took = started.elapsed();
    let e = match result {
        Err(e @ LockError::Backend { .. }) => e,
        other => panic!("{url}: expected a backend error, got {:?}", other.map(drop)),
    };
    assert!(
        took <= limit,
        "{url}: took {took:?}, more than {limit:?}: {e}"
    );
    eprintln!("{url}: {e} after {took:?}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_a_retryable_error_within_the_socket_timeout_in_every_mode() {
    let silent = Silent::start();
    let p = silent.port;
    for url in [
        format!("redis://127.0.0.1:{p}"),
        format!("rediss://127.0.0.1:{p}"),
        format!("redis+cluster://127.0.0.1:{p}"),
        format!("redis+sentinel://127.0.0.1:{p}/mymaster"),
    ] {
        let e = refused_within(&url, 1.0, Duration::from_secs(1) + SLACK).await;
        assert!(e.is_retryable(), "{url}: {e}");
    }
    // The default timeout (10 s) is the bound too: no retries behind it.
    let e = refused_within(
        &format!("redis://127.0.0.1:{p}"),
        10.0,
        Duration::from_secs(10) + SLACK,
    )
    .await;
    assert!(e.is_retryable(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plain_server_fails_within_the_timeout_and_says_so() {
    let plain = RedisServer::start();
    let url = format!("rediss://127.0.0.1:{}", plain.port());
    let e = refused_within(&url, 1.0, Duration::from_secs(1) + SLACK).await;
    let text = e.to_string();
    assert!(
        text.contains("is the server speaking TLS?") && text.contains("redis://"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_to_a_tls_server_fails_at_once_and_says_so() {
    let tls = RedisServer::start_tls();
    let url = format!("redis://127.0.0.1:{}", tls.port());
    let e = refused_within(&url, 1.0, Duration::from_secs(1) + SLACK).await;
    let text = e.to_string();
    assert!(
        text.contains("TLS only") && text.contains("rediss://"),
        "{text}"
    );
    // A refused connection is no such case: no hint.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let e = refused_within(&format!("redis://127.0.0.1:{port}"), 1.0, SLACK).await;
    assert!(!e.to_string().contains("TLS"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_to_a_stalled_server_ends_within_the_socket_timeout() {
    let server = RedisServer::start();
    let mut config = config(&server.url(), 1.0);
    config.key_prefix = Some(support::unique_prefix("bound"));
    let store = LockStore::create(Some(&config)).await.expect("connects");
    store.lock("warm").await.unwrap().release().await.unwrap();
    server.sigstop();
    // The first call times out; the ones after it may find the connection
    // being replaced, and must not wait longer for that.
    for i in 0..3 {
        let started = Instant::now();
        let result = store
            .lock_with(
                &format!("stalled-{i}"),
                LockOptions::default().with_wait_time(Duration::from_millis(100)),
            )
            .await;
        let took = started.elapsed();
        match result {
            Err(e @ LockError::Backend { .. }) => assert!(e.is_retryable(), "{e}"),
            other => panic!("call {i}: {:?}", other.map(drop)),
        }
        assert!(
            took <= Duration::from_secs(1) + SLACK,
            "call {i} took {took:?}"
        );
    }
    server.sigcont();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.lock("after").await {
            Ok(guard) => break guard.release().await.unwrap(),
            Err(e) if Instant::now() < deadline && e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    }
}

/// The reproduction: `ticketlock inspect` against a server that
/// never answers took 30 s with the default 10 s timeout.
#[test]
fn the_cli_gives_up_on_a_silent_server_within_the_default_timeout() {
    let silent = Silent::start();
    let url = format!("redis://user:s3cret@127.0.0.1:{}", silent.port);
    let runs: Vec<_> = [
        vec!["inspect", "x", "--redis", &url],
        vec!["simulate", "--redis", &url],
        vec!["scripts", "load", "--redis", &url],
    ]
    .into_iter()
    .map(|args| {
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        // Side by side: each waits for the whole timeout.
        std::thread::spawn(move || {
            let started = Instant::now();
            let out = Command::new(env!("CARGO_BIN_EXE_ticketlock"))
                .args(&args)
                .env_remove("REDIS_URL")
                .env_remove("TICKET_LOCK_LIFETIME")
                .output()
                .expect("running ticketlock");
            (args, out, started.elapsed())
        })
    })
    .collect();
    for run in runs {
        let (args, out, took) = run.join().expect("a runner thread");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(
            took <= Duration::from_secs(10) + SLACK,
            "{args:?} took {took:?}"
        );
        assert!(stderr.contains("timed out"), "{args:?}: {stderr}");
        eprintln!("{} gave up after {took:?}", args[0]);
        assert!(!stderr.contains("s3cret"), "{args:?}: {stderr}");
    }
}
