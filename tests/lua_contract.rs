//! The Lua contract as another client calls it (redis-cli, Python, Node):
//! raw `FCALL`s of the `ticketlock_v2` library on a private server, for the
//! rules the crate's own API reaches only through timing (a cancel that
//! arrives before its issue, cancellations remembered across a deleted
//! record and forgotten after their time, the holder told when an admin
//! cleans up the last ticket, a picked-up grant renewed past its first lease).
//! Each of these was a mutant of `scripts/mutants.sh` that no other test
//! noticed.

mod support;

use std::thread;
use std::time::Duration;

use ticketlock::LIBRARY_NAME;

struct Server {
    _server: support::RedisServer,
    client: redis::Client,
    conn: redis::Connection,
}

impl Server {
    fn start() -> Server {
        let server = support::RedisServer::start();
        let client = redis::Client::open(server.url().as_str()).unwrap();
        let conn = server.library_connection();
        Server {
            _server: server,
            client,
            conn,
        }
    }

    fn fcall(&mut self, op: &str, cid: &str, args: &[&str]) -> Vec<redis::Value> {
        redis::cmd("FCALL")
            .arg(format!("{LIBRARY_NAME}_{op}"))
            .arg(1)
            .arg(key(cid))
            .arg(args)
            .query(&mut self.conn)
            .unwrap_or_else(|e| panic!("{op}: {e}"))
    }

    /// The reply as integers (the fields this test reads are all integers).
    fn ints(&mut self, op: &str, cid: &str, args: &[&str]) -> Vec<i64> {
        self.fcall(op, cid, args)
            .into_iter()
            .map(|v| redis::from_redis_value(v).unwrap_or(i64::MIN))
            .collect()
    }
}

fn key(cid: &str) -> String {
    format!("lock:{{{cid}}}")
}

/// lifetime 60 s, renewing (liveness 5 s), under `request`.
fn issue(s: &mut Server, cid: &str, request: &str) -> Vec<i64> {
    s.ints("issue", cid, &["60000", "5000", request])
}

#[test]
fn a_cancel_that_comes_first_makes_the_issue_take_nothing() {
    let mut s = Server::start();
    assert_eq!(s.ints("cancel", "c1", &["req-a", "60000"]), [0, -1]);
    assert_eq!(issue(&mut s, "c1", "req-a"), [-1, -1, -1, -1, -1]);
    // Nothing was taken: the next issue is served at once, as ticket 0.
    let served = issue(&mut s, "c1", "req-b");
    assert_eq!(served[0], 0, "{served:?}");
    assert_eq!(served[2], 0, "{served:?}");
}

#[test]
fn cancellations_outlive_a_deleted_record_and_end_after_their_time() {
    let mut s = Server::start();
    // A holder, then a cancel for a request whose issue has not arrived.
    assert_eq!(issue(&mut s, "c2", "holder")[0], 0);
    assert_eq!(s.ints("cancel", "c2", &["late", "60000"]), [0, -1]);
    // The holder leaves and the record goes; the cancel must not.
    assert_eq!(
        s.ints("release", "c2", &["0", "cleanup", "", "owner"]),
        [1, -1]
    );
    assert_eq!(issue(&mut s, "c2", "late"), [-1, -1, -1, -1, -1]);

    // A cancel remembered 50 ms is forgotten once that has passed: the next
    // write drops it (inspect counts the cancellations remembered, field 11).
    assert_eq!(s.ints("cancel", "c3", &["short", "50"]), [0, -1]);
    thread::sleep(Duration::from_millis(120));
    assert_eq!(s.ints("cancel", "c3", &["long", "60000"]), [0, -1]);
    let inspected = s.ints("inspect", "c3", &["-1"]);
    assert_eq!(
        inspected[10], 1,
        "only the live cancellation is kept: {inspected:?}"
    );
}

/// Both ways the last live ticket can leave: as the only ticket
/// (release.lua's fast path) and beside an expired one (common.lua's leave).
#[test]
fn an_admin_cleanup_of_the_last_ticket_tells_its_holder() {
    let mut s = Server::start();
    told_when_removed(&mut s, "c4", false);
    told_when_removed(&mut s, "c6", true);
}

fn told_when_removed(s: &mut Server, cid: &str, beside_an_expired_ticket: bool) {
    assert_eq!(issue(s, cid, "holder")[0], 0);
    if beside_an_expired_ticket {
        // A fixed ticket behind the holder, expired by the time of the cleanup.
        assert_eq!(s.ints("issue", cid, &["50", "", ""])[0], 1);
        thread::sleep(Duration::from_millis(120));
    }
    let mut sub = s.client.get_connection().unwrap();
    sub.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe(key(cid)).unwrap();
    // Not the owner (ARGV[4] empty): someone else removed the holder's ticket.
    assert_eq!(s.ints("release", cid, &["0", "cleanup", "", ""]), [1, -1]);
    let message = pubsub
        .get_message()
        .expect("the holder was not told its ticket was removed");
    let payload: String = message.get_payload().unwrap();
    let fields: Vec<&str> = payload.split(' ').collect();
    // "<epoch> <serving> ...": nobody is served now, so the holder's grant is gone.
    assert_eq!(fields[1], "-1", "{payload}");
}

#[test]
fn a_picked_up_grant_renews_past_its_first_lease() {
    let mut s = Server::start();
    // Lease 300 ms, served at once; the issue reply is its pick-up.
    let issued = s.ints("issue", "c5", &["300", "5000", "r"]);
    assert_eq!(issued[0], 0);
    let fence = issued[4].to_string();
    thread::sleep(Duration::from_millis(100));
    let extended = s.ints("extend", "c5", &["0", &fence, "2000"]);
    assert_eq!(extended[0], 1, "{extended:?}");
    // Past the first lease, the renewed one still holds.
    thread::sleep(Duration::from_millis(400));
    let read = s.ints("read", "c5", &["-1"]);
    assert_eq!(
        read[3], 1,
        "the renewed grant expired with its first lease: {read:?}"
    );
    assert!(read[5] > 1000, "{read:?}");
}
