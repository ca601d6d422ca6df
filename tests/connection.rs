//! Connecting to real servers: passwords, ACL users, TLS, socket timeouts,
//! restarts, `SCRIPT FLUSH` and unreachable servers.
//! Long on purpose: one self-contained test per way of reaching a server.
//!
//! Every test starts its own `redis-server` (`support::RedisServer`), on
//! 127.0.0.1 only, killed by pid on drop: they configure, freeze and restart
//! it, so `REDIS_URL` and the shared server are never used here.

mod support;

use std::error::Error as _;
use std::future::Future;
use std::time::{Duration, Instant};

use support::{ping_port, RedisServer};
use ticketlock::{LockError, LockOptions, LockStore, ScriptMode, StoreConfig};

const PASSWORD: &str = "s3cret";
const WRONG_PASSWORD: &str = "wr0ngpass";
/// A hand-off that rides a pub/sub push takes milliseconds; the waiter's own
/// poll is 30 s away (see [`patient`]), so anything under this was pushed.
const PROMPT: Duration = Duration::from_secs(2);
/// Slack on top of a configured socket timeout before an error must be back.
const MARGIN: Duration = Duration::from_millis(1500);

/// Waits without polling (30 s between checks), so only a pushed wake-up can
/// hand the lock over promptly; never waits more than 20 s in all.
fn patient() -> LockOptions {
    LockOptions::default()
        .with_wait_time(Duration::from_secs(30))
        .with_timeout(Duration::from_secs(20))
}

/// A Redis config for `127.0.0.1:<port>` with a fresh key prefix.
fn local_config(port: u16) -> StoreConfig {
    let mut config = StoreConfig::redis("127.0.0.1");
    config.port = Some(port);
    config.key_prefix = Some(support::unique_prefix("conn"));
    config
}

async fn lock_and_release(store: &LockStore, cid: &str) -> Result<(), LockError> {
    let guard = store.lock_with(cid, patient()).await?;
    assert_eq!(guard.conversation_id(), cid);
    guard.release().await
}

/// `a` holds the lock, `b` queues behind it and goes to sleep; releasing in
/// `a` must hand the lock to `b` promptly, i.e. by a pushed wake-up.
async fn assert_prompt_handoff(a: &LockStore, b: &LockStore, cid: &str) {
    let held = a
        .lock_with(cid, patient())
        .await
        .expect("first lock of the hand-off");
    let waiter = {
        let b = b.clone();
        let cid = cid.to_owned();
        tokio::spawn(async move {
            let result = b.lock_with(&cid, patient()).await;
            (result, Instant::now())
        })
    };
    // Until the waiter's ticket is queued...
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lock = a.get_lock(cid).await.expect("get_lock during hand-off");
        if lock.is_some_and(|l| l.tickets().len() == 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiter's ticket never showed up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and it has subscribed, polled once and gone to sleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter got the lock while it was held"
    );
    let released = Instant::now();
    held.release().await.expect("release of the hand-off");
    let (result, acquired) = tokio::time::timeout(PROMPT * 3, waiter)
        .await
        .expect("the waiter was not handed the lock (no pushed wake-up?)")
        .expect("waiter task");
    let guard = result.expect("the waiter's lock");
    let took = acquired.duration_since(released);
    assert!(
        took < PROMPT,
        "hand-off took {took:?}: the wake-up was not pushed"
    );
    guard.release().await.expect("release by the waiter");
}

/// The error's Display, Debug and every source's Display and Debug.
fn everything_shown(e: &LockError) -> String {
    let mut shown = format!("{e}\n{e:?}");
    let mut source = e.source();
    while let Some(s) = source {
        shown.push_str(&format!("\n{s}\n{s:?}"));
        source = s.source();
    }
    shown
}

/// Runs `connect` and returns its error; fails the test if it connects, or
/// takes longer than `within` to fail (hangs included).
async fn connect_error<F>(what: &str, within: Duration, connect: F) -> LockError
where
    F: Future<Output = Result<LockStore, LockError>>,
{
    let started = Instant::now();
    let outcome = tokio::time::timeout(within + Duration::from_secs(10), connect)
        .await
        .unwrap_or_else(|_| panic!("{what}: still connecting after {:?}", started.elapsed()));
    let took = started.elapsed();
    match outcome {
        Ok(store) => panic!("{what}: connected ({store:?})"),
        Err(e) => {
            assert!(
                took <= within,
                "{what}: took {took:?} (allowed {within:?}) to fail with: {e}"
            );
            e
        }
    }
}

fn assert_backend(what: &str, e: &LockError) {
    assert!(
        matches!(e, LockError::Backend { .. }),
        "{what}: expected LockError::Backend, got {e:?}"
    );
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("raw client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

async fn keys(conn: &mut redis::aio::MultiplexedConnection, db: i64, pattern: &str) -> Vec<String> {
    redis::cmd("SELECT")
        .arg(db)
        .query_async::<()>(conn)
        .await
        .expect("SELECT");
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .expect("KEYS")
}

// --- a. password ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_url_or_config_connects_and_a_wrong_one_is_a_clean_error() {
    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let port = server.port();

    // In the URL.
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}");
    let store = LockStore::from_url(&url)
        .await
        .expect("from_url with password");
    lock_and_release(&store, "by-url")
        .await
        .expect("lock by url");
    assert!(
        !format!("{store:?}").contains(PASSWORD),
        "the store's Debug shows the password: {store:?}"
    );

    // In a config, with db 0 (the default would be 1).
    let mut config = local_config(port);
    config.password = Some(PASSWORD.into());
    config.db = Some(0);
    let prefix = config.key_prefix.clone().unwrap();
    let store = LockStore::create(Some(&config))
        .await
        .expect("create with password");
    let guard = store.lock_with("by-config", patient()).await.expect("lock");
    let mut conn = raw(&format!("{url}/0")).await;
    let pattern = format!("{prefix}:*");
    assert!(
        !keys(&mut conn, 0, &pattern).await.is_empty(),
        "no key under {pattern} in db 0 while the lock is held"
    );
    assert!(
        keys(&mut conn, 1, &pattern).await.is_empty(),
        "keys in db 1 although the config says db 0"
    );
    guard.release().await.expect("release");
    assert!(!format!("{store:?}").contains(PASSWORD));

    // Wrong password (URL and config), and none at all.
    let within = Duration::from_secs(10) + MARGIN;
    let wrong_url = format!("redis://:{WRONG_PASSWORD}@127.0.0.1:{port}");
    let mut wrong_config = local_config(port);
    wrong_config.password = Some(WRONG_PASSWORD.into());
    wrong_config.socket_timeout = Some(2.0);
    let cases = [
        (
            "wrong password in url",
            connect_error(
                "wrong password in url",
                within,
                LockStore::from_url(&wrong_url),
            )
            .await,
        ),
        (
            "wrong password in config",
            connect_error(
                "wrong password in config",
                Duration::from_secs(2) + MARGIN,
                LockStore::create(Some(&wrong_config)),
            )
            .await,
        ),
        (
            "no password",
            connect_error("no password", within, LockStore::from_url(&server.url())).await,
        ),
    ];
    for (what, e) in &cases {
        assert_backend(what, e);
        let shown = everything_shown(e);
        assert!(
            !shown.contains(PASSWORD),
            "{what}: shows the password: {shown}"
        );
        assert!(
            !shown.contains(WRONG_PASSWORD),
            "{what}: shows the wrong password: {shown}"
        );
        assert!(
            !e.is_retryable(),
            "{what}: an authentication failure is not worth retrying, but is_retryable() is true: {e:?}"
        );
    }
}

// --- b. ACL users -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_connects_and_missing_key_permissions_are_a_typed_error() {
    let server = RedisServer::start();
    let port = server.port();
    let mut admin = raw(&server.url()).await;
    for rule in [
        &["bot", "on", ">pw", "~*", "&*", "+@all"][..],
        &["limited", "on", ">pw2", "~other:*", "&*", "+@all"][..],
    ] {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(rule)
            .query_async(&mut admin)
            .await
            .expect("ACL SETUSER");
    }

    // A user with every permission: locks, and hands over (SUBSCRIBE allowed).
    let mut config = local_config(port);
    config.username = Some("bot".into());
    config.password = Some("pw".into());
    let a = LockStore::create(Some(&config))
        .await
        .expect("connect as bot");
    let b = LockStore::create(Some(&config))
        .await
        .expect("connect as bot");
    lock_and_release(&a, "acl").await.expect("lock as bot");
    assert_prompt_handoff(&a, &b, "acl-handoff").await;
    let whoami: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .expect("CLIENT LIST");
    assert!(
        whoami.contains("user=bot"),
        "no connection of user bot: {whoami}"
    );

    // A user that may only touch `other:*`: the library's keys are refused.
    let mut limited = local_config(port);
    limited.username = Some("limited".into());
    limited.password = Some("pw2".into());
    let store = LockStore::create(Some(&limited))
        .await
        .expect("authenticating as limited works; only its keys are limited");
    let started = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(15), store.lock_with("acl", patient()))
        .await
        .expect("lock() as a user without key permissions hangs")
        .expect_err("lock() as a user without permission on the keys succeeded");
    assert_backend("no key permissions", &e);
    let shown = e.to_string();
    assert!(
        shown.contains("NOPERM") || shown.to_lowercase().contains("no permissions"),
        "the error does not say permissions are missing: {shown}"
    );
    assert!(
        !e.is_retryable(),
        "a permission error is not retryable: {e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Control: the same user with a prefix inside its key pattern works, so
    // the refusal above was about the keys.
    limited.key_prefix = Some("other".into());
    let store = LockStore::create(Some(&limited))
        .await
        .expect("connect as limited");
    lock_and_release(&store, "acl")
        .await
        .expect("lock as limited under other:*");
}

// --- c. TLS ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connects_and_hands_over_and_an_untrusted_certificate_is_a_clean_error() {
    let server = RedisServer::start_tls();
    let port = server.port();
    assert!(
        !ping_port(port, Duration::from_millis(500)),
        "the TLS port answers plain text"
    );

    // `#insecure`: the self-signed certificate is accepted, with the
    // `tls-insecure` feature (scripts/test.sh turns it on). Without it,
    // asking to skip the checks is refused, never quietly done.
    let url = format!("rediss://127.0.0.1:{port}/#insecure");
    if cfg!(feature = "tls-insecure") {
        let a = LockStore::from_url(&url).await.expect("rediss #insecure");
        let b = LockStore::from_url(&url).await.expect("rediss #insecure");
        lock_and_release(&a, "tls").await.expect("lock over TLS");
        // Pub/sub pushes travel over TLS too.
        assert_prompt_handoff(&a, &b, "tls-handoff").await;

        // The same URL as a config's host, with a key prefix.
        let mut config = StoreConfig::redis(url.clone());
        config.key_prefix = Some(support::unique_prefix("tls"));
        let c = LockStore::create(Some(&config))
            .await
            .expect("config with a rediss #insecure url");
        assert_prompt_handoff(&c, &c, "tls-config").await;
    } else {
        match LockStore::from_url(&url).await {
            Err(LockError::InvalidInput {
                what: "ssl_insecure",
                reason,
            }) => assert!(reason.contains("tls-insecure"), "{reason}"),
            other => panic!("#insecure without the feature: {:?}", other.map(drop)),
        }
    }

    // Verified TLS against a certificate nobody trusts: a clear error, fast.
    let verified = format!("rediss://127.0.0.1:{port}");
    let mut by_url = StoreConfig::redis(verified.clone());
    by_url.socket_timeout = Some(1.0);
    let mut use_ssl = local_config(port);
    use_ssl.use_ssl = true;
    use_ssl.socket_timeout = Some(1.0);
    let cases = [
        (
            "rediss:// url",
            connect_error(
                "rediss:// url",
                Duration::from_secs(10) + MARGIN,
                LockStore::from_url(&verified),
            )
            .await,
        ),
        (
            "rediss:// config host",
            connect_error(
                "rediss:// config host",
                Duration::from_secs(1) + MARGIN,
                LockStore::create(Some(&by_url)),
            )
            .await,
        ),
        (
            "use_ssl config",
            connect_error(
                "use_ssl config",
                Duration::from_secs(1) + MARGIN,
                LockStore::create(Some(&use_ssl)),
            )
            .await,
        ),
    ];
    for (what, e) in &cases {
        assert_backend(what, e);
        let shown = everything_shown(e).to_lowercase();
        assert!(
            shown.contains("certificate"),
            "{what}: the error does not say the certificate was refused: {e}"
        );
        assert!(
            !e.is_retryable(),
            "{what}: retrying cannot fix an untrusted certificate: {e:?}"
        );
    }

    // Plain text against the TLS port: an error, not a hang.
    let mut plain = local_config(port);
    plain.socket_timeout = Some(1.0);
    let e = connect_error(
        "plain text to a TLS port",
        Duration::from_secs(1) + MARGIN,
        LockStore::create(Some(&plain)),
    )
    .await;
    assert_backend("plain text to a TLS port", &e);
}

// --- d. socket timeout --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_times_out_retryably_and_the_same_store_recovers() {
    let server = RedisServer::start();
    let mut config = local_config(server.port());
    config.socket_timeout = Some(1.0);
    let store = LockStore::create(Some(&config)).await.expect("connect");
    lock_and_release(&store, "x").await.expect("warm-up");

    server.sigstop();
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), store.get_lock("x")).await;
    let took = started.elapsed();
    let e = outcome
        .unwrap_or_else(|_| panic!("get_lock on a frozen server hangs (> 10 s)"))
        .expect_err("get_lock on a frozen server succeeded");
    assert!(
        took <= Duration::from_secs(1) + MARGIN,
        "get_lock took {took:?} to fail with a 1 s socket timeout: {e}"
    );
    assert_backend("frozen server", &e);
    assert!(e.is_retryable(), "a timeout must be retryable: {e:?}");

    server.sigcont();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut errors = Vec::new();
    loop {
        match store.get_lock("x").await {
            Ok(lock) => {
                assert!(lock.is_none(), "x was released: {lock:?}");
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "non-retryable error after SIGCONT: {e:?}");
                errors.push(e.to_string());
            }
        }
        assert!(
            Instant::now() < deadline,
            "the store did not recover within 5 s of SIGCONT: {errors:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lock_and_release(&store, "x")
        .await
        .expect("lock after recovery");
}

// --- e. restart -----------------------------------------------------------------

/// Retries `lock_and_release` for up to `limit`; every error must be
/// retryable. Returns the errors seen before it succeeded.
async fn keep_trying(store: &LockStore, cid: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut errors = Vec::new();
    loop {
        match lock_and_release(store, cid).await {
            Ok(()) => return errors,
            Err(e) => {
                assert!(
                    e.is_retryable(),
                    "non-retryable error: {e:?} (after {errors:#?})"
                );
                errors.push(e.to_string());
            }
        }
        assert!(
            Instant::now() < deadline,
            "no success within {limit:?}: {errors:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_store_keeps_working_across_a_server_restart() {
    let mut server = RedisServer::start();
    let mut config = local_config(server.port());
    config.socket_timeout = Some(2.0);
    let store = LockStore::create(Some(&config)).await.expect("connect");
    let other = LockStore::create(Some(&config)).await.expect("connect");
    lock_and_release(&store, "r").await.expect("before restart");

    // While the server is down: a retryable error, within the socket timeout.
    server.stop();
    let started = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(10), store.get_lock("r"))
        .await
        .expect("get_lock with the server down hangs")
        .expect_err("get_lock with the server down succeeded");
    assert_backend("server down", &e);
    assert!(e.is_retryable(), "server down must be retryable: {e:?}");
    assert!(
        started.elapsed() <= Duration::from_secs(2) + MARGIN,
        "server down: took {:?} to fail",
        started.elapsed()
    );

    server.restart(); // empty data set, no scripts loaded
    let errors = keep_trying(&store, "r", Duration::from_secs(10)).await;
    assert!(
        errors.len() <= 5,
        "more than a few errors before recovering: {errors:#?}"
    );
    // Both stores work again, pushes included.
    keep_trying(&other, "r", Duration::from_secs(10)).await;
    assert_prompt_handoff(&store, &other, "r-handoff").await;
    // The default (Auto) mode runs the Functions library, which the restart
    // erased: it must have been loaded again.
    let libraries: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(ticketlock::LIBRARY_NAME)
        .query_async(&mut raw(&server.url()).await)
        .await
        .expect("FUNCTION LIST");
    assert!(
        format!("{libraries:?}").contains(ticketlock::LIBRARY_NAME),
        "the library was not loaded again after the restart: {libraries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_across_a_restart_is_told_promptly() {
    let mut server = RedisServer::start();
    let mut config = local_config(server.port());
    config.socket_timeout = Some(2.0);
    let store = LockStore::create(Some(&config)).await.expect("connect");
    let held = store.lock_with("w", patient()).await.expect("lock");
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.lock_with("w", patient()).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished());

    // The restart loses both tickets; the waiter must not sleep out its
    // 30 s wait time or its 20 s timeout.
    server.restart();
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was not told about the restart within 10 s")
        .expect("waiter task");
    match outcome {
        Err(LockError::Expired { .. }) => {}
        Err(e) if e.is_retryable() => {}
        Err(e) => panic!("waiter across a restart: unexpected {e:?}"),
        Ok(_guard) => panic!("the waiter got a lock whose ticket the restart erased"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // The holder's ticket is gone as well.
    let released = tokio::time::timeout(Duration::from_secs(10), held.release())
        .await
        .expect("release after restart hangs");
    assert!(
        matches!(&released, Err(e) if matches!(e, LockError::Expired { .. }) || e.is_retryable()),
        "release of a ticket erased by a restart: {released:?}"
    );
    keep_trying(&store, "w", Duration::from_secs(10)).await;
}

// --- f. SCRIPT FLUSH ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_is_handled_without_a_single_error() {
    let server = RedisServer::start();
    let mut config = local_config(server.port());
    config.script_mode = ScriptMode::Eval;
    let store = LockStore::create(Some(&config)).await.expect("connect");
    let other = LockStore::create(Some(&config)).await.expect("connect");
    let mut admin = raw(&server.url()).await;
    lock_and_release(&store, "f").await.expect("warm-up");

    async fn flush(admin: &mut redis::aio::MultiplexedConnection) {
        let reply: String = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(admin)
            .await
            .expect("SCRIPT FLUSH");
        // (Not asserting "0 cached scripts" here: a guard's background
        // pick-up may already have loaded one again.)
        assert_eq!(reply, "OK");
    }

    // Every operation, each right after a flush: no error may surface.
    flush(&mut admin).await;
    let guard = store.lock("f").await.expect("lock after flush");
    flush(&mut admin).await;
    let lock = store.get_lock("f").await.expect("get_lock after flush");
    assert_eq!(lock.expect("record").tickets().len(), 1);
    flush(&mut admin).await;
    assert!(store
        .is_someone_waiting("f")
        .await
        .expect("is_someone_waiting after flush"));
    flush(&mut admin).await;
    store
        .update_lock("f")
        .await
        .expect("update_lock after flush");
    flush(&mut admin).await;
    guard.release().await.expect("release after flush");
    flush(&mut admin).await;
    let ticket = store
        .issue_ticket("g", Duration::from_secs(30))
        .await
        .expect("issue_ticket after flush");
    flush(&mut admin).await;
    let lock = store.get_or_create_lock("g").await.expect("read");
    flush(&mut admin).await;
    store.save_lock(&lock).await.expect("save_lock after flush");
    flush(&mut admin).await;
    store
        .finish_serving("g", ticket)
        .await
        .expect("finish_serving after flush");
    flush(&mut admin).await;
    store
        .delete_lock("g")
        .await
        .expect("delete_lock after flush");
    // The waiter's poll, after a flush while it waits.
    let held = store.lock_with("h", patient()).await.expect("lock h");
    let waiter = {
        let other = other.clone();
        tokio::spawn(async move { other.lock_with("h", patient()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    flush(&mut admin).await;
    held.release().await.expect("release h after flush");
    let guard = tokio::time::timeout(PROMPT * 3, waiter)
        .await
        .expect("waiter not served after a flush")
        .expect("waiter task")
        .expect("waiter's lock after flush");
    flush(&mut admin).await;
    guard.release().await.expect("waiter's release after flush");
}

// --- g. unreachable -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_retryable_error_not_a_panic() {
    let e = connect_error(
        "redis://127.0.0.1:1",
        Duration::from_secs(15),
        LockStore::from_url("redis://127.0.0.1:1"),
    )
    .await;
    assert_backend("unreachable", &e);
    assert!(
        e.is_retryable(),
        "connection refused must be retryable: {e:?}"
    );
}

// --- the harness's additions ----------------------------------------------------

#[test]
fn harness_start_with_keeps_its_arguments_across_restart() {
    let mut server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let port = server.port();
    assert!(server.ping(), "log:\n{}", server.log());
    // A plain PING is refused (NOAUTH): the password is really required.
    assert!(!ping_port(port, Duration::from_secs(1)));
    let pid = server.pid();
    server.restart();
    assert_ne!(server.pid(), pid);
    assert_eq!(server.port(), port);
    assert!(server.ping(), "log:\n{}", server.log());
    assert!(!ping_port(port, Duration::from_secs(1)));
    assert_eq!(server.extra_args(), ["--requirepass", PASSWORD]);
}

#[test]
fn harness_tls_server_speaks_only_tls_and_survives_restart() {
    let mut server = RedisServer::start_tls();
    let port = server.port();
    let tls = server.tls_files().expect("tls files").clone();
    for file in [&tls.ca_cert, &tls.cert, &tls.key] {
        assert!(file.starts_with(server.dir()), "{}", file.display());
        assert!(file.is_file(), "{}", file.display());
    }
    assert_eq!(server.url(), format!("rediss://127.0.0.1:{port}"));
    assert!(server.ping());
    assert!(!ping_port(port, Duration::from_millis(500)));
    // Verification against another CA fails: the check really verifies.
    let other = tempdir_for_certs();
    let foreign = support::generate_tls_certs(&other);
    assert!(!support::tls_ping(
        port,
        &foreign.ca_cert,
        None,
        Duration::from_secs(5)
    ));
    let _ = std::fs::remove_dir_all(&other);
    server.restart();
    assert_eq!(server.port(), port);
    assert!(server.ping(), "log:\n{}", server.log());
    server.stop();
    assert!(!server.ping());
}

fn tempdir_for_certs() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ticketlock-certs-{}", support::unique_prefix("")));
    std::fs::create_dir(&dir).expect("temp dir for certificates");
    dir
}

// --- FUNCTION FLUSH ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_flush_is_handled_without_a_single_error() {
    let server = RedisServer::start();
    let mut config = local_config(server.port());
    config.script_mode = ScriptMode::Functions;
    let store = LockStore::create(Some(&config)).await.expect("connect");
    let other = LockStore::create(Some(&config)).await.expect("connect");
    let mut admin = raw(&server.url()).await;
    lock_and_release(&store, "ff").await.expect("warm-up");

    async fn flush(admin: &mut redis::aio::MultiplexedConnection) {
        let reply: String = redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query_async(admin)
            .await
            .expect("FUNCTION FLUSH");
        assert_eq!(reply, "OK");
    }

    flush(&mut admin).await;
    let guard = store.lock("ff").await.expect("lock after flush");
    flush(&mut admin).await;
    assert_eq!(
        store
            .get_lock("ff")
            .await
            .expect("read after flush")
            .expect("record")
            .tickets()
            .len(),
        1
    );
    // A waiter on another store, across a flush, is handed the lock promptly.
    let waiter = {
        let other = other.clone();
        tokio::spawn(async move { other.lock_with("ff", patient()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    flush(&mut admin).await;
    guard.release().await.expect("release after flush");
    let next = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("hand-over after FUNCTION FLUSH was not prompt")
        .expect("waiter task")
        .expect("waiter lock");
    flush(&mut admin).await;
    next.release().await.expect("release after flush");
    assert_eq!(store.get_lock("ff").await.expect("read"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_mode_fails_clearly_where_functions_are_not_permitted() {
    let server = RedisServer::start();
    let mut admin = raw(&server.url()).await;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "nofunc",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
            "-function",
        ])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let mut config = local_config(server.port());
    config.username = Some("nofunc".into());
    config.password = Some("pw".into());
    // Auto falls back to EVALSHA...
    let auto = LockStore::create(Some(&config))
        .await
        .expect("auto mode connects");
    lock_and_release(&auto, "nf")
        .await
        .expect("auto mode works through EVALSHA");
    // ...while Functions mode refuses at creation, with a typed error.
    config.script_mode = ScriptMode::Functions;
    match LockStore::create(Some(&config)).await {
        Err(e @ LockError::Backend { .. }) => {
            assert!(!e.is_retryable(), "{e:?}");
            assert!(e.to_string().to_lowercase().contains("perm"), "{e}");
        }
        other => panic!("functions mode without FUNCTION permission: {other:?}"),
    }
}
