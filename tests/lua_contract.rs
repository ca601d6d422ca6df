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

/// Sets up `cid` with a holder on a 200 ms lease (ticket 0) and a renewing
/// waiter (ticket 1), and lets the holder's lease lapse: the next script to
/// run on the conversation must hand the lock to ticket 1. Returns the
/// record's epoch.
fn a_lapsed_holder_and_a_waiter(s: &mut Server, cid: &str) -> String {
    let holder = s.ints("issue", cid, &["200", "60000", "holder"]);
    assert_eq!((holder[0], holder[2]), (0, 0), "{holder:?}");
    let waiter = issue(s, cid, "waiter");
    assert_eq!((waiter[0], waiter[2]), (1, 0), "{waiter:?}");
    thread::sleep(Duration::from_millis(300));
    holder[1].to_string()
}

/// The wake-up the next message on `pubsub` carries, as its fields.
fn told(pubsub: &mut redis::PubSub<'_>, what: &str) -> Vec<i64> {
    let message = pubsub
        .get_message()
        .unwrap_or_else(|e| panic!("{what}: the new holder was not told: {e}"));
    let payload: String = message.get_payload().unwrap();
    payload.split(' ').map(|f| f.parse().unwrap()).collect()
}

/// Whichever script finds the lapsed lease makes the next grant, and every
/// one of them announces it: the waiter must not sleep until its own
/// check-in (a third of its 60 s liveness here).
#[test]
fn a_grant_made_by_any_script_is_announced() {
    let mut s = Server::start();
    let cases: [(&str, &str); 4] = [
        ("issue", "a newcomer's issue"),
        ("poll", "another waiter's check-in"),
        ("extend", "the lapsed holder's extend"),
        ("update", "update_lock"),
    ];
    for (op, what) in cases {
        let cid = format!("grant-by-{op}");
        let epoch = a_lapsed_holder_and_a_waiter(&mut s, &cid);
        let mut sub = s.client.get_connection().unwrap();
        sub.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut pubsub = sub.as_pubsub();
        pubsub.subscribe(key(&cid)).unwrap();
        match op {
            "issue" => {
                let newcomer = issue(&mut s, &cid, "newcomer");
                assert_eq!((newcomer[0], newcomer[2]), (2, 1), "{what}: {newcomer:?}");
            }
            "poll" => {
                // The lapsed holder's own poll: gone, and the lock moves on.
                let polled = s.ints("poll", &cid, &["0", &epoch]);
                assert_eq!((polled[0], polled[1]), (-1, 1), "{what}: {polled:?}");
            }
            "extend" => {
                let fence = s.ints("inspect", &cid, &["0"])[5].to_string();
                assert_eq!(
                    s.ints("extend", &cid, &["0", &fence, "1000"]),
                    [0, -1],
                    "{what}"
                );
            }
            _ => assert_eq!(s.ints("update", &cid, &[]), [1, 1], "{what}"),
        }
        let wake = told(&mut pubsub, what);
        assert_eq!(wake[1], 1, "{what}: the wake-up names ticket 1: {wake:?}");
        assert!(wake[2] > 0, "{what}: with its fencing token: {wake:?}");
    }
}

/// The epoch tells a ticket from one that reuses its number after the record
/// was deleted: a poll with the old epoch is gone, never served.
#[test]
fn a_poll_from_an_older_record_is_gone() {
    let mut s = Server::start();
    let first = issue(&mut s, "c8", "first");
    assert_eq!(first[0], 0);
    let old_epoch = first[1].to_string();
    assert_eq!(
        s.ints("release", "c8", &["0", "cleanup", &old_epoch, "owner"]),
        [1, -1]
    );
    thread::sleep(Duration::from_millis(2));
    let second = issue(&mut s, "c8", "second");
    assert_eq!(second[0], 0, "numbering starts afresh: {second:?}");
    assert_ne!(second[1], first[1], "a new record, a new epoch");
    let polled = s.ints("poll", "c8", &["0", &old_epoch]);
    assert_eq!(polled[0], -1, "the old ticket 0 is gone: {polled:?}");
    assert_eq!(polled[5], -1, "and gets no fencing token: {polled:?}");
}

/// A poll picks a grant up: from then on inspect no longer counts it as
/// waiting for its owner.
#[test]
fn a_poll_picks_the_grant_up() {
    let mut s = Server::start();
    let holder = issue(&mut s, "c9", "holder");
    let epoch = holder[1].to_string();
    assert_eq!(issue(&mut s, "c9", "waiter")[0], 1);
    assert_eq!(
        s.ints("release", "c9", &["0", "cleanup", &epoch, "owner"]),
        [1, 1]
    );
    let inspected = s.ints("inspect", "c9", &["0"]);
    assert!(
        inspected[6] >= 0,
        "granted, not yet picked up: {inspected:?}"
    );
    let polled = s.ints("poll", "c9", &["1", &epoch]);
    assert_eq!(polled[0], 1, "{polled:?}");
    let inspected = s.ints("inspect", "c9", &["0"]);
    assert_eq!(inspected[6], -1, "picked up by the poll: {inspected:?}");
}

/// A record whose counter is not an integer (a fraction, text, an infinity)
/// is refused by every script that reads it, and left as it was.
#[test]
fn a_record_with_a_counter_that_is_not_an_integer_is_refused() {
    let mut s = Server::start();
    for (i, bad) in ["1.5", "abc", "inf", "1e400"].into_iter().enumerate() {
        let conversation = format!("c10-{i}");
        assert_eq!(issue(&mut s, &conversation, "a")[0], 0);
        let _: () = redis::cmd("HSET")
            .arg(key(&conversation))
            .arg("n")
            .arg(bad)
            .query(&mut s.conn)
            .unwrap();
        let refused: redis::RedisResult<redis::Value> = redis::cmd("FCALL")
            .arg(format!("{LIBRARY_NAME}_issue"))
            .arg(1)
            .arg(key(&conversation))
            .arg(&["60000", "5000", "b"])
            .query(&mut s.conn);
        let error = refused.expect_err(&format!("a counter of {bad} was accepted"));
        assert!(error.to_string().contains("WRONGTYPE"), "{error}");
        assert!(
            error.to_string().contains(&format!("field n holds {bad}")),
            "{error}"
        );
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(key(&conversation))
            .query(&mut s.conn)
            .unwrap();
        assert!(!fields.contains(&"t1".to_string()), "{bad}: {fields:?}");
    }
}

/// A snapshot saved back keeps each ticket's request id, so a caller whose
/// issue timed out can still give its ticket back with cancel.
#[test]
fn a_saved_ticket_can_still_be_cancelled() {
    let mut s = Server::start();
    assert_eq!(issue(&mut s, "c11", "holder")[0], 0);
    assert_eq!(issue(&mut s, "c11", "gave-up")[0], 1);
    let read = s.ints("read", "c11", &["-1"]);
    assert_eq!(read[3], 2, "{read:?}");
    let mut args: Vec<String> = vec![read[1].to_string()];
    args.extend(read[4..].iter().map(|v| v.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(s.ints("save", "c11", &args), [0]);
    assert_eq!(
        s.ints("cancel", "c11", &["gave-up", "60000"]),
        [1, 1],
        "the saved ticket 1 was not found by its request id"
    );
}
