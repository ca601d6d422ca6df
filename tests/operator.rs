//! What an operator meets at the edges: `ticketlock inspect` under the
//! README's least-privilege ACL user and on a Redis that is out of memory
//! (the two moments it is needed most), and a Redis where clients of the
//! previous Lua contract (v1) and of this one (v2) meet.

mod support;

use std::process::{Command, Stdio};

use ticketlock::{LockError, LockStore, StoreConfig};

/// The README's "Access control" rule, `inspect`'s line included.
const README_ACL: &str = "-@all +fcall +fcall_ro +function|load +evalsha +script|load \
    +subscribe +unsubscribe +ping +time +hmget +hgetall +hset +hdel +del +pexpireat +publish \
    +type +pttl";

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn inspect(url: &str, prefix: Option<&str>, cid: &str) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ticketlock"));
    command.args(["inspect", cid, "--redis", url, "--json"]);
    if let Some(prefix) = prefix {
        command.args(["--key-prefix", prefix]);
    }
    let out = command
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .output()
        .expect("running ticketlock inspect");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn admin(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_works_under_the_readme_acl_user() {
    let server = support::RedisServer::start();
    let prefix = support::unique_prefix("acl");
    let mut conn = admin(&server.url());
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg("operator")
        .arg("on")
        .arg(">s3cret")
        .arg("resetkeys")
        .arg(format!("~{prefix}:lock:*"))
        .arg("resetchannels")
        .arg(format!("&{prefix}:lock:*"));
    for rule in README_ACL.split_whitespace() {
        setuser.arg(rule);
    }
    let _: () = setuser.query(&mut conn).unwrap();
    let url = format!("redis://operator:s3cret@127.0.0.1:{}/0", server.port());
    let mut config = StoreConfig::redis(url.as_str());
    config.key_prefix = Some(prefix.clone());
    let store = LockStore::create(Some(&config)).await.unwrap();
    let guard = store.lock("stuck").await.unwrap();

    let run = tokio::task::spawn_blocking({
        let (url, prefix) = (url.clone(), prefix.clone());
        move || inspect(&url, Some(&prefix), "stuck")
    })
    .await
    .unwrap();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["exists"], true, "{v}");
    assert_eq!(v["served"]["ticket"], 0, "{v}");
    assert_eq!(v["served"]["fence"], guard.fencing_token(), "{v}");
    assert!(!run.stderr.contains("s3cret") && !run.stdout.contains("s3cret"));
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_works_on_a_redis_that_is_out_of_memory() {
    let server = support::RedisServer::start_with(&[
        "--maxmemory",
        "4mb",
        "--maxmemory-policy",
        "noeviction",
    ]);
    let url = server.url();
    let store = LockStore::from_url(&url).await.unwrap();
    let guard = store.lock("full").await.unwrap();
    // Fill the server until it refuses writes.
    let mut conn = admin(&url);
    let blob = "x".repeat(64 * 1024);
    let mut refused = false;
    for i in 0..1000 {
        let set: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("junk:{i}"))
            .arg(&blob)
            .query(&mut conn);
        if let Err(e) = set {
            assert!(e.to_string().contains("OOM"), "{e}");
            refused = true;
            break;
        }
    }
    assert!(refused, "the server never ran out of memory");
    // Reads go on: through the library and through the CLI.
    let inspection = store.inspect("full").await.unwrap();
    let record = inspection.record.unwrap();
    assert_eq!(record.served, Some(0));
    assert_eq!(record.live, 1);
    let run = tokio::task::spawn_blocking(move || inspect(&url, None, "full"))
        .await
        .unwrap();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["served"]["fence"], guard.fencing_token(), "{v}");
    assert_eq!(v["depth"], 1, "{v}");
    assert!(store.get_lock("full").await.unwrap().is_some());
    drop(guard);
}

/// The v1 scripts (three keys; kept in tests/fixtures/lua_v1) and the v2
/// ones refuse each other's records, changing nothing, so clients of two
/// versions never share a conversation silently (README: "Versions sharing
/// one Redis").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_clients_refuse_each_others_records() {
    let server = support::RedisServer::start();
    let store = LockStore::from_url(&server.url()).await.unwrap();
    let mut conn = admin(&server.url());
    let v1_issue = format!(
        "{}{}",
        include_str!("fixtures/lua_v1/common.lua"),
        include_str!("fixtures/lua_v1/issue.lua")
    );
    let v1 = |conn: &mut redis::Connection, cid: &str| -> redis::RedisResult<Vec<i64>> {
        let meta = format!("lock:{{{cid}}}");
        redis::cmd("EVAL")
            .arg(&v1_issue)
            .arg(3)
            .arg(&meta)
            .arg(format!("{meta}:q"))
            .arg(format!("{meta}:e"))
            .arg(60000)
            .arg(5000)
            .query(conn)
    };
    let dump = |conn: &mut redis::Connection, cid: &str| -> Vec<(String, String)> {
        redis::cmd("HGETALL")
            .arg(format!("lock:{{{cid}}}"))
            .query(conn)
            .unwrap()
    };

    // A v2 record: a v1 client refuses it.
    let guard = store.lock("new").await.unwrap();
    let before = dump(&mut conn, "new");
    let err = v1(&mut conn, "new").unwrap_err();
    assert!(err.to_string().contains("holds a non-number"), "{err}");
    assert_eq!(dump(&mut conn, "new"), before);

    // A v1 record: the v2 store refuses it.
    assert_eq!(v1(&mut conn, "old").unwrap()[0], 0);
    let before = dump(&mut conn, "old");
    for result in [
        store.lock("old").await.map(drop),
        store.get_lock("old").await.map(drop),
        store.cleanup("old", 0).await,
    ] {
        match result {
            Err(LockError::Corrupted { detail, .. }) => {
                assert!(detail.contains("another ticketlock version"), "{detail}")
            }
            other => panic!("expected Corrupted, got {other:?}"),
        }
    }
    assert_eq!(dump(&mut conn, "old"), before);
    guard.release().await.unwrap();
}
