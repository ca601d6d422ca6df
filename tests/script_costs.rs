//! What each script costs the server, counted: every `redis.call` a script
//! makes shows in `INFO commandstats` beside the FCALL that ran it. One
//! Redis thread serves every client, and each call costs about half a
//! microsecond on top of its own work, so the common paths have a budget:
//! an uncontended issue at most 8 calls, releasing the only ticket at most 5.
//! The counts of the other paths are printed (`--nocapture`) for the record.

mod support;

use std::collections::BTreeMap;

use ticketlock::{LockStore, LIBRARY_NAME};

const ISSUE_BUDGET: f64 = 8.0;
const RELEASE_BUDGET: f64 = 5.0;
const ROUNDS: u64 = 50;

struct Server {
    _server: support::RedisServer,
    conn: redis::Connection,
    url: String,
}

impl Server {
    fn start() -> Server {
        let server = support::RedisServer::start();
        let url = server.url();
        let conn = server.library_connection();
        Server {
            _server: server,
            conn,
            url,
        }
    }

    fn fcall(&mut self, op: &str, cid: &str, args: &[&str]) -> Vec<i64> {
        redis::cmd("FCALL")
            .arg(format!("{LIBRARY_NAME}_{op}"))
            .arg(1)
            .arg(format!("lock:{{{cid}}}"))
            .arg(args)
            .query(&mut self.conn)
            .unwrap_or_else(|e| panic!("{op}: {e}"))
    }

    fn reset(&mut self) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut self.conn)
            .unwrap();
    }

    /// Commands run since the last reset, by name, without the ones that
    /// came from outside the scripts.
    fn inside(&mut self) -> BTreeMap<String, u64> {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn)
            .unwrap();
        stats
            .lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter_map(|l| {
                let (name, rest) = l.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .filter(|(name, _)| {
                ![
                    "fcall",
                    "fcall_ro",
                    "evalsha",
                    "eval",
                    "info",
                    "config|resetstat",
                    "ping",
                    "hello",
                ]
                .contains(&name.as_str())
                    && !name.starts_with("client|")
                    && !name.starts_with("function|")
                    && !name.starts_with("script|")
                    && !name.starts_with("subscribe")
                    && !name.starts_with("unsubscribe")
            })
            .collect()
    }

    /// Average commands per run of `op`, each run prepared by `setup` (not counted).
    fn per_run(
        &mut self,
        what: &str,
        mut setup: impl FnMut(&mut Server, u64),
        mut op: impl FnMut(&mut Server, u64),
    ) -> f64 {
        let mut total: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..ROUNDS {
            setup(self, i);
            self.reset();
            op(self, i);
            for (name, calls) in self.inside() {
                *total.entry(name).or_default() += calls;
            }
        }
        let sum: u64 = total.values().sum();
        let per = sum as f64 / ROUNDS as f64;
        let detail: Vec<String> = total
            .iter()
            .map(|(n, c)| format!("{n} {}", *c as f64 / ROUNDS as f64))
            .collect();
        println!("{what}: {per} redis.calls ({})", detail.join(", "));
        per
    }
}

fn issue(s: &mut Server, cid: &str, request: &str) -> Vec<i64> {
    s.fcall("issue", cid, &["60000", "5000", request])
}

#[test]
fn the_common_paths_stay_within_their_budget_of_redis_calls() {
    let mut s = Server::start();
    // Uncontended: an empty conversation, then its only ticket leaves.
    let issued = s.per_run(
        "issue, empty conversation",
        |_, _| {},
        |s, i| {
            issue(s, &format!("u{i}"), &format!("r{i}"));
        },
    );
    let released = s.per_run(
        "release, the only ticket",
        |_, _| {},
        |s, i| {
            s.fcall("release", &format!("u{i}"), &["0", "cleanup", "", "owner"]);
        },
    );
    // Contended: a waiter behind a holder.
    let queued = s.per_run(
        "issue behind a holder",
        |s, i| {
            issue(s, &format!("h{i}"), "");
        },
        |s, i| {
            issue(s, &format!("h{i}"), &format!("w{i}"));
        },
    );
    let polled = s.per_run(
        "poll, waiting (a check-in)",
        |_, _| {},
        |s, i| {
            s.fcall("poll", &format!("h{i}"), &["1", ""]);
        },
    );
    let handed = s.per_run(
        "release with a waiter (hand-off)",
        |_, _| {},
        |s, i| {
            s.fcall("release", &format!("h{i}"), &["0", "cleanup", "", "owner"]);
        },
    );
    let picked = s.per_run(
        "poll, the grant's pick-up",
        |_, _| {},
        |s, i| {
            s.fcall("poll", &format!("h{i}"), &["1", ""]);
        },
    );
    let extended = s.per_run(
        "extend",
        |_, _| {},
        |s, i| {
            let fence: String = redis::cmd("HGET")
                .arg(format!("lock:{{h{i}}}"))
                .arg("f")
                .query(&mut s.conn)
                .unwrap();
            // Counted: the HGET above is this test's own, so it is taken off.
            s.fcall("extend", &format!("h{i}"), &["1", &fence, "60000"]);
        },
    ) - 1.0;
    println!("extend without the test's own HGET: {extended}");
    let _ = (queued, polled, handed, picked);
    assert!(
        issued <= ISSUE_BUDGET,
        "an uncontended issue makes {issued} redis.calls (budget {ISSUE_BUDGET})"
    );
    assert!(
        released <= RELEASE_BUDGET,
        "releasing the only ticket makes {released} redis.calls (budget {RELEASE_BUDGET})"
    );
}

/// Through the crate: an uncontended `lock` + `release` is two script runs
/// (two round trips) and stays within both budgets together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_lock_and_release_through_the_crate_stay_within_budget() {
    let mut s = Server::start();
    let store = LockStore::from_url(&s.url).await.unwrap();
    store.lock("warm").await.unwrap().release().await.unwrap();
    s.reset();
    for i in 0..ROUNDS {
        store
            .lock(&format!("c{i}"))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let inside: u64 = s.inside().values().sum();
    let per_cycle = inside as f64 / ROUNDS as f64;
    println!("lock + release through the crate: {per_cycle} redis.calls per cycle");
    assert!(per_cycle <= ISSUE_BUDGET + RELEASE_BUDGET, "{per_cycle}");
}
