//! Test harness shared by the integration tests (`mod support;`).
//!
//! It starts private `redis-server` (and `valkey-server`) processes on free
//! loopback ports, so the tests never depend on a system Redis service (the
//! Debian package's own service on 6379, if any, is never used). Every
//! process it starts listens on 127.0.0.1 only and is stopped by its own pid.
//!
//! * [`RedisServer`] (`server.rs`) — one private server, owned by a test;
//!   killed (and its temp dir removed) on drop. It also offers `stop`/
//!   `restart`/`sigstop`/`sigcont` for fault-injection tests.
//!   [`RedisServer::start_with`] adds `redis-server` arguments
//!   (`--requirepass`, ACLs, ...); [`RedisServer::start_valkey`] runs
//!   `valkey-server` instead ([`Program::Valkey`]: `$VALKEY_SERVER`, which
//!   `scripts/test.sh` provides).
//! * The supervisor (`process.rs`) — picks free loopback ports, keeps each
//!   server's log in its temp dir, and gives every server process a small
//!   `sh` watchdog that kills it within ~0.5 s of the test process going
//!   away, however that happens (normal exit, panic, abort, SIGKILL), so
//!   shared servers that are never dropped never outlive the test binary.
//! * [`ping`] — one PING on redis-rs (plain or TLS, verifying the server's
//!   certificate against a given CA), behind every readiness check here.
//! * [`redis_url`] — `$REDIS_URL` if set and non-empty, else the URL of a
//!   server shared by every test of this test binary, started lazily once;
//!   [`valkey_url`] likewise for Valkey.
//! * [`unique_prefix`] — alphanumeric key prefixes, unique per call and per
//!   process, so tests sharing one server never see each other's keys.
//! * TLS (`tls.rs`) — [`RedisServer::start_tls`] /
//!   [`RedisServer::start_tls_mutual`] serve TLS only, with a throwaway CA,
//!   server and client certificates made by one signing function
//!   ([`generate_tls_certs`], [`generate_client_cert`]; needs the `openssl`
//!   CLI). `restart` keeps the same arguments and certificates.
//! * [`RedisCluster`] (`cluster.rs`) — a private Redis Cluster of N masters,
//!   optionally with replicas and a manual failover
//!   ([`RedisCluster::builder`], [`RedisCluster::failover`]), created with
//!   `redis-cli --cluster create`; [`cluster_url`] is one shared by the test
//!   binary.
//! * [`SentinelServer`], [`SentinelDeployment`] (`sentinel.rs`) — a private
//!   Redis Sentinel, and master + replica + sentinel together.
//! * [`example_binary`] (`examples.rs`) — an example built for the tests
//!   that run it as a separate process; [`spawn_loopers`] and
//!   [`disjoint_sections`] (`participants.rs`) run the `participant` example
//!   in a loop and check the log of critical sections it keeps.
//!
//! Never skipped silently: if `redis-server` is not on `PATH` and `REDIS_URL`
//! is unset (or a Valkey test finds no `valkey-server`, or a TLS test no
//! `openssl`), every function that needs one panics with a message saying
//! how to get it.
#![allow(dead_code, unused_imports)]

mod cluster;
mod examples;
mod participants;
mod process;
mod sentinel;
mod sentinel_secure;
mod server;
mod tls;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use cluster::{cluster_url, shared_cluster, ClusterBuilder, RedisCluster};
pub use examples::example_binary;
pub use participants::{
    disjoint_sections, finish_all, section_counter_key, section_log_key, spawn_loopers, Section,
};
pub use sentinel::{shared_sentinel, SentinelDeployment, SentinelServer, SENTINEL_DATA_NODE_ARGS};
pub use sentinel_secure::{
    shared_secure_sentinel, SecureSentinelDeployment, SECURE_DATA_PASSWORD,
    SECURE_SENTINEL_PASSWORD,
};
pub use server::{
    connect, ping, ping_port, Program, RedisServer, NO_REDIS_MESSAGE, NO_VALKEY_MESSAGE,
};
pub use tls::{
    generate_client_cert, generate_tls_certs, tls_ping, ClientCert, ClientTls, TlsFiles,
    NO_OPENSSL_MESSAGE,
};

/// Message of the panic raised when a cluster or sentinel test needs redis-cli.
pub const NO_REDIS_CLI_MESSAGE: &str = "the cluster and sentinel tests need redis-cli \
     (Debian: it comes with redis-server: apt-get install -y redis-server) — or run \
     scripts/test.sh, which installs it";

/// The Redis URL for tests that just need *a* server: `$REDIS_URL` if set
/// and non-empty, else the URL of a server shared by the whole test binary
/// (started on first use; lives until the test binary exits). Tests sharing
/// it must keep to their own keys (see [`unique_prefix`]).
pub fn redis_url() -> String {
    if let Some(url) = env_redis_url() {
        return url;
    }
    #[cfg(feature = "docker")]
    if server::on_path("redis-server").is_none() {
        return docker::shared_url();
    }
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    // Never dropped (statics aren't): the server's watchdog kills it once
    // this process is gone.
    SHARED.get_or_init(RedisServer::start).url()
}

/// The URL of a `valkey-server` shared by the whole test binary (started on
/// first use, like [`redis_url`]'s); panics saying how to get Valkey when
/// there is none.
pub fn valkey_url() -> String {
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    SHARED.get_or_init(RedisServer::start_valkey).url()
}

/// `$REDIS_URL` if it is set and non-empty.
pub fn env_redis_url() -> Option<String> {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// An alphanumeric-only string (`[A-Za-z0-9]+`) unique per call, within this
/// process and across processes: the tag's alphanumeric chars, then the pid,
/// a per-process counter and the current time in nanoseconds (base 36).
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{tag}p{}c{}t{}",
        base36(u128::from(std::process::id())),
        base36(u128::from(n)),
        base36(nanos)
    )
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// Runs `redis-cli -h 127.0.0.1 -p <port> <args>` (plain text, no TLS, no
/// password) and returns its stdout, trimmed; panics if redis-cli cannot run.
/// Its stdout is not a terminal, so replies come raw: one line per element.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running redis-cli: {e}\n{NO_REDIS_CLI_MESSAGE}"));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Waits up to `limit` for `check` to hold, polling every 50 ms; panics
/// with `what` (and the last observation) if it never does.
pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(()) => return,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not so after {limit:?}; last seen:\n{last}")
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The last resort of [`redis_url`] on machines with Docker but without
/// `redis-server`: a Redis container (`cargo test --features docker`).
#[cfg(feature = "docker")]
mod docker {
    use std::sync::OnceLock;

    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::SyncRunner;
    use testcontainers::{Container, GenericImage};

    pub(super) fn shared_url() -> String {
        static SHARED: OnceLock<Container<GenericImage>> = OnceLock::new();
        let container = SHARED.get_or_init(|| {
            GenericImage::new("redis", "7.2")
                .with_exposed_port(6379.tcp())
                .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
                .start()
                .unwrap_or_else(|e| panic!("{}\n(docker: {e})", super::NO_REDIS_MESSAGE))
        });
        let port = container
            .get_host_port_ipv4(6379)
            .expect("the container's Redis port");
        format!("redis://127.0.0.1:{port}")
    }
}

/// `a` holds `cid`, `b` queues behind it and sleeps (it would not check the
/// queue for 30 s); releasing in `a` must hand the lock to `b` by a pushed
/// wake-up, within 2 s. Returns how long the hand-off took.
pub async fn pushed_handoff(
    a: &ticketlock::LockStore,
    b: &ticketlock::LockStore,
    cid: &str,
) -> Duration {
    let patient = ticketlock::LockOptions::default()
        .with_wait_time(Duration::from_secs(30))
        .with_dead_waiter_timeout(Duration::from_secs(90))
        .with_timeout(Duration::from_secs(20));
    let held = a.lock_with(cid, patient).await.expect("first lock");
    let waiter = {
        let b = b.clone();
        let cid = cid.to_owned();
        tokio::spawn(async move {
            let result = b.lock_with(&cid, patient).await;
            (result, Instant::now())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while a
        .get_lock(cid)
        .await
        .expect("get_lock")
        .is_none_or(|l| l.tickets().len() != 2)
    {
        assert!(
            Instant::now() < deadline,
            "the waiter's ticket never showed up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let it subscribe, poll once and go to sleep.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter got the lock while it was held"
    );
    let released = Instant::now();
    held.release().await.expect("release");
    let (result, acquired) = tokio::time::timeout(Duration::from_secs(6), waiter)
        .await
        .expect("the waiter was not handed the lock (no pushed wake-up?)")
        .expect("waiter task");
    result
        .expect("the waiter's lock")
        .release()
        .await
        .expect("release by the waiter");
    let took = acquired.duration_since(released);
    assert!(
        took < Duration::from_secs(2),
        "hand-off took {took:?}: not pushed"
    );
    took
}
