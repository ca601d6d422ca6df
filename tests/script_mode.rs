//! `ScriptMode::Auto` runs the scripts the way the server will take them:
//! Functions only where `FCALL` and `FCALL_RO` answer (not merely where
//! `FUNCTION LOAD` does), EVALSHA where either is renamed away or denied by
//! an ACL, and a switch to EVALSHA (once, with a warning) when FCALL is
//! refused mid-run. `ScriptMode::Functions` never switches.

mod support;

use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use support::{redis_cli, RedisServer};
use ticketlock::{LockError, LockStore, ScriptMode, StoreConfig};

/// Every warning the library logs in this test binary.
fn warnings() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        log
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Lines of the fallback warning logged for keys under `prefix` so far.
fn fallback_warnings(prefix: &str) -> usize {
    let log = warnings();
    let log = log.lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| l.contains("refused FCALL") && l.contains(prefix))
        .count()
}

/// `cmdstat_<command>` of INFO commandstats: (calls, rejected_calls).
fn stat(port: u16, auth: &[&str], command: &str) -> (u64, u64) {
    let mut args = auth.to_vec();
    args.extend(["INFO", "commandstats"]);
    let info = redis_cli(port, &args);
    let line = info
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{command}:")));
    let field = |name: &str| {
        line.and_then(|l| l.split([':', ',']).find_map(|kv| kv.strip_prefix(name)))
            .and_then(|v| v.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("calls"), field("rejected_calls"))
}

fn config(url: &str, mode: ScriptMode) -> StoreConfig {
    let mut config = StoreConfig::from_url(url).expect("url");
    config.script_mode = mode;
    config.key_prefix = Some(support::unique_prefix("mode"));
    config.socket_timeout = Some(5.0);
    config
}

async fn lock_and_release(store: &LockStore, cid: &str) -> Result<(), LockError> {
    store.lock(cid).await?.release().await
}

fn acl(port: u16, rule: &[&str]) {
    let mut args = vec!["ACL", "SETUSER"];
    args.extend(rule);
    assert_eq!(redis_cli(port, &args), "OK", "ACL SETUSER {rule:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_runs_evalsha_where_fcall_is_renamed_away() {
    let _ = warnings();
    for renamed in [&["FCALL"][..], &["FCALL", "FCALL_RO"][..]] {
        let mut args = Vec::new();
        for command in renamed {
            args.extend(["--rename-command", command, ""]);
        }
        let server = RedisServer::start_with(&args);
        let port = server.port();
        let config = config(&server.url(), ScriptMode::Auto);
        let store = LockStore::create(Some(&config))
            .await
            .unwrap_or_else(|e| panic!("{renamed:?}: auto mode connects: {e}"));
        let (before, _) = stat(port, &[], "evalsha");
        for i in 0..3 {
            lock_and_release(&store, &format!("renamed-{i}"))
                .await
                .unwrap_or_else(|e| panic!("{renamed:?}: {e}"));
        }
        let (after, rejected) = stat(port, &[], "evalsha");
        assert!(
            after >= before + 6,
            "{renamed:?}: {before} -> {after} EVALSHA"
        );
        assert_eq!(rejected, 0);
        // Decided at connect: nothing was refused later, nothing to warn about.
        assert_eq!(fallback_warnings(config.key_prefix.as_deref().unwrap()), 0);

        // The reproduction: simulate on such a server broke every lock.
        let out = Command::new(env!("CARGO_BIN_EXE_ticketlock"))
            .args(["simulate", "--messages", "20", "--json", "--redis"])
            .arg(format!("redis://127.0.0.1:{port}/0"))
            .env_remove("REDIS_URL")
            .env_remove("TICKET_LOCK_LIFETIME")
            .output()
            .expect("running ticketlock");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{renamed:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_runs_evalsha_for_an_acl_user_denied_fcall() {
    let _ = warnings();
    let server = RedisServer::start();
    let port = server.port();
    for (user, denied) in [
        ("nofcall", &["-fcall"][..]),
        ("nofcalls", &["-fcall", "-fcall_ro"][..]),
    ] {
        let mut rule = vec![user, "on", ">pw", "~*", "&*", "+@all"];
        rule.extend(denied);
        acl(port, &rule);
        let url = format!("redis://{user}:pw@127.0.0.1:{port}");
        let store = LockStore::create(Some(&config(&url, ScriptMode::Auto)))
            .await
            .unwrap_or_else(|e| panic!("{user}: auto mode connects: {e}"));
        let (fcall_before, _) = stat(port, &[], "fcall");
        lock_and_release(&store, user)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let (fcall_after, _) = stat(port, &[], "fcall");
        assert_eq!(fcall_before, fcall_after, "{user}: FCALL was still sent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcall_refused_mid_run_switches_to_evalsha_once_and_warns() {
    let _ = warnings();
    let server = RedisServer::start();
    let port = server.port();
    acl(port, &["app", "on", ">pw", "~*", "&*", "+@all"]);
    let url = format!("redis://app:pw@127.0.0.1:{port}");
    let config = config(&url, ScriptMode::Auto);
    let prefix = config.key_prefix.clone().unwrap();
    let store = LockStore::create(Some(&config)).await.expect("connects");
    let other = store.clone();
    lock_and_release(&store, "before").await.expect("lock");
    let (fcalls, rejected) = stat(port, &[], "fcall");
    assert!(
        fcalls >= 2 && rejected == 0,
        "Functions mode expected: {fcalls}"
    );

    // The ACL changes under the running store.
    acl(port, &["app", "-fcall", "-fcall_ro"]);
    lock_and_release(&store, "after")
        .await
        .expect("the refused call is repeated by EVALSHA");
    let (_, rejected_once) = stat(port, &[], "fcall");
    assert!(rejected_once >= 1, "FCALL was never refused");
    for i in 0..5 {
        lock_and_release(&other, &format!("later-{i}"))
            .await
            .expect("later calls run by EVALSHA");
    }
    let (_, rejected_later) = stat(port, &[], "fcall");
    assert_eq!(
        rejected_later, rejected_once,
        "FCALL was tried again after the switch"
    );
    let (evalsha, _) = stat(port, &[], "evalsha");
    assert!(evalsha >= 12, "{evalsha} EVALSHA");
    // One warning for the one switch (it names the key of the refused call).
    let log = String::from_utf8_lossy(&warnings().lock().unwrap()).into_owned();
    assert_eq!(fallback_warnings(&prefix), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_mode_reports_a_refusal_instead_of_switching() {
    let server = RedisServer::start();
    let port = server.port();
    acl(port, &["fixed", "on", ">pw", "~*", "&*", "+@all"]);
    let url = format!("redis://fixed:pw@127.0.0.1:{port}");
    let store = LockStore::create(Some(&config(&url, ScriptMode::Functions)))
        .await
        .expect("connects");
    lock_and_release(&store, "before").await.expect("lock");
    acl(port, &["fixed", "-fcall", "-fcall_ro"]);
    match store.lock("after").await {
        Err(e @ LockError::Backend { .. }) => {
            assert!(!e.is_retryable(), "{e}");
            assert!(e.to_string().contains("permissions to run"), "{e}");
        }
        other => panic!("{:?}", other.map(drop)),
    }
}
