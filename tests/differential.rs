//! Differential testing: random sequences of operations, time passing
//! included, run against the in-memory store and the Redis store must give
//! the same observable results. Both run on a manual clock (a test-only
//! variant of the scripts reads time from a key instead of `TIME`; see
//! `ticketlock::__testing`), so expiry is compared exactly, to the millisecond.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use ticketlock::__testing::{manual_clock_stores, ManualClock, Wakeups};
use ticketlock::{LockError, LockOptions, LockStore, Ticket, TicketLock};

/// A saved ticket: number, remaining ms, and for a renewing ticket its lease
/// and dead-waiter timeout in ms.
type SavedTicket = (u64, u64, Option<(u64, u64)>);

#[derive(Debug, Clone)]
enum Step {
    Issue {
        cid: usize,
        lifetime_ms: u64,
    },
    TryLock {
        cid: usize,
        lifetime_ms: u64,
    },
    ReleaseGuard {
        cid: usize,
    },
    Extend {
        cid: usize,
        lease_ms: u64,
    },
    Finish {
        cid: usize,
        ticket: u64,
    },
    Cleanup {
        cid: usize,
        ticket: u64,
    },
    Update {
        cid: usize,
    },
    Get {
        cid: usize,
    },
    Waiting {
        cid: usize,
    },
    Save {
        cid: usize,
        next: u64,
        tickets: Vec<SavedTicket>,
    },
    /// Rasa's read-modify-write with nothing modified: `get_lock`, then
    /// `save_lock` of the same snapshot.
    SaveBack {
        cid: usize,
    },
    /// The guard asks the store whether it still holds the lock.
    Held {
        cid: usize,
    },
    Delete {
        cid: usize,
    },
    Pass {
        ms: u64,
    },
}

const IDS: [&str; 2] = ["a", "b{c}"];

fn step() -> impl Strategy<Value = Step> {
    let cid = 0..IDS.len();
    // Few, round durations, so expiries often fall exactly on "now": the
    // boundary is where two implementations would most easily differ.
    let ms = prop::sample::select(vec![1u64, 2, 3, 5, 10, 100, 1000]);
    prop_oneof![
        4 => (cid.clone(), ms.clone()).prop_map(|(cid, lifetime_ms)| Step::Issue { cid, lifetime_ms }),
        3 => (cid.clone(), ms.clone()).prop_map(|(cid, lifetime_ms)| Step::TryLock { cid, lifetime_ms }),
        2 => cid.clone().prop_map(|cid| Step::ReleaseGuard { cid }),
        1 => (cid.clone(), ms.clone()).prop_map(|(cid, lease_ms)| Step::Extend { cid, lease_ms }),
        2 => (cid.clone(), 0u64..8).prop_map(|(cid, ticket)| Step::Finish { cid, ticket }),
        2 => (cid.clone(), 0u64..8).prop_map(|(cid, ticket)| Step::Cleanup { cid, ticket }),
        1 => cid.clone().prop_map(|cid| Step::Update { cid }),
        3 => cid.clone().prop_map(|cid| Step::Get { cid }),
        1 => cid.clone().prop_map(|cid| Step::Waiting { cid }),
        1 => (cid.clone(), 0u64..10, prop::collection::vec((0u64..10, prop::sample::select(vec![0u64, 1, 2, 5, 100]), prop::option::of((ms.clone(), ms.clone()))), 0..4))
            .prop_map(|(cid, next, tickets)| Step::Save { cid, next, tickets }),
        1 => cid.clone().prop_map(|cid| Step::SaveBack { cid }),
        1 => cid.clone().prop_map(|cid| Step::Held { cid }),
        1 => cid.clone().prop_map(|cid| Step::Delete { cid }),
        4 => ms.prop_map(|ms| Step::Pass { ms }),
    ]
}

/// A snapshot as compared: (number, remaining ms, lease ms, dead-waiter
/// ms) per ticket, and the last number issued.
type Snapshot = (Vec<(u64, u64, Option<u64>, Option<u64>)>, Option<u64>);

/// What a step showed, with backend-specific values (epochs, fencing token
/// values) left out; fencing tokens are compared by order instead.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Done,
    Number(u64),
    Flag(bool),
    Lock(Option<Snapshot>),
    Granted { ticket: u64, fence_rank: usize },
    NotGranted(&'static str),
    Error(&'static str),
}

fn kind(e: &LockError) -> &'static str {
    match e {
        LockError::Timeout { .. } => "timeout",
        LockError::Expired { .. } => "expired",
        LockError::InvalidInput { .. } => "invalid",
        LockError::Corrupted { .. } => "corrupted",
        _ => "backend",
    }
}

fn seen<T>(r: Result<T, LockError>, f: impl FnOnce(T) -> Seen) -> Seen {
    match r {
        Ok(v) => f(v),
        Err(e) => Seen::Error(kind(&e)),
    }
}

struct Side {
    store: LockStore,
    clock: ManualClock,
    guards: Vec<Option<ticketlock::LockGuard>>,
    /// Fencing tokens of each conversation's grants, in grant order.
    fences: [Vec<u64>; 2],
}

impl Side {
    async fn apply(&mut self, step: &Step) -> Seen {
        let s = &self.store;
        match *step {
            Step::Issue { cid, lifetime_ms } => seen(
                s.issue_ticket(IDS[cid], Duration::from_millis(lifetime_ms))
                    .await,
                Seen::Number,
            ),
            Step::TryLock { cid, lifetime_ms } => {
                if self.guards[cid].is_some() {
                    return Seen::NotGranted("already held here");
                }
                let options = LockOptions::default()
                    .with_lifetime(Duration::from_millis(lifetime_ms))
                    .with_timeout(Duration::ZERO);
                match s.lock_with(IDS[cid], options).await {
                    Ok(guard) => {
                        let ticket = guard.ticket();
                        self.fences[cid].push(guard.fencing_token());
                        let fence_rank = self.fences[cid].len();
                        self.guards[cid] = Some(guard);
                        Seen::Granted { ticket, fence_rank }
                    }
                    Err(e) => Seen::NotGranted(kind(&e)),
                }
            }
            Step::ReleaseGuard { cid } => match self.guards[cid].take() {
                Some(guard) => seen(guard.release().await, |()| Seen::Done),
                None => Seen::NotGranted("no guard"),
            },
            Step::Extend { cid, lease_ms } => match &self.guards[cid] {
                Some(guard) => seen(guard.extend(Duration::from_millis(lease_ms)).await, |()| {
                    Seen::Done
                }),
                None => Seen::NotGranted("no guard"),
            },
            Step::Finish { cid, ticket } => {
                seen(s.finish_serving(IDS[cid], ticket).await, |()| Seen::Done)
            }
            Step::Cleanup { cid, ticket } => {
                seen(s.cleanup(IDS[cid], ticket).await, |()| Seen::Done)
            }
            Step::Update { cid } => seen(s.update_lock(IDS[cid]).await, |()| Seen::Done),
            Step::Get { cid } => seen(s.get_lock(IDS[cid]).await, |lock| {
                Seen::Lock(lock.map(|l| {
                    let ms = |d: Duration| d.as_millis() as u64;
                    let tickets = l
                        .tickets()
                        .iter()
                        .map(|t| {
                            (
                                t.number(),
                                ms(t.expires_in()),
                                t.lease().map(ms),
                                t.dead_waiter_timeout().map(ms),
                            )
                        })
                        .collect();
                    (tickets, l.last_issued())
                }))
            }),
            Step::Waiting { cid } => seen(s.is_someone_waiting(IDS[cid]).await, Seen::Flag),
            Step::Save {
                cid,
                next,
                ref tickets,
            } => {
                let mut lock = TicketLock::new(IDS[cid]);
                let ms = Duration::from_millis;
                let saved: Vec<Ticket> = tickets
                    .iter()
                    .map(|&(n, left, terms)| match terms {
                        Some((lease, dead)) => Ticket::renewing(n, ms(left), ms(lease), ms(dead)),
                        None => Ticket::new(n, ms(left)),
                    })
                    .collect();
                let json = serde_json::json!({
                    "conversation_id": IDS[cid], "next_number": next, "tickets": saved,
                });
                lock = serde_json::from_value(json).unwrap_or(lock);
                seen(s.save_lock(&lock).await, |()| Seen::Done)
            }
            Step::SaveBack { cid } => match s.get_lock(IDS[cid]).await {
                Ok(Some(lock)) => seen(s.save_lock(&lock).await, |()| Seen::Done),
                Ok(None) => Seen::NotGranted("no record"),
                Err(e) => Seen::Error(kind(&e)),
            },
            Step::Held { cid } => match &self.guards[cid] {
                Some(guard) => seen(guard.is_held().await, Seen::Flag),
                None => Seen::NotGranted("no guard"),
            },
            Step::Delete { cid } => seen(s.delete_lock(IDS[cid]).await, |()| Seen::Done),
            Step::Pass { ms } => {
                self.clock.advance(Duration::from_millis(ms)).await;
                Seen::Done
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn memory_and_redis_agree(steps in prop::collection::vec(step(), 1..40)) {
        let rt = runtime();
        let url = support::redis_url();
        let outcome: Result<(), String> = rt.block_on(async move {
            let prefix = support::unique_prefix("diff");
            let ((memory, memory_clock), (redis, redis_clock)) = manual_clock_stores(&url, &prefix).await.unwrap();
            let mut heard = Vec::new();
            for store in [&memory, &redis] {
                let mut side = Vec::new();
                for id in IDS {
                    side.push(Wakeups::listen(store, id).await.unwrap());
                }
                heard.push(side);
            }
            let mut sides = [
                Side { store: memory, clock: memory_clock, guards: vec![None, None], fences: [Vec::new(), Vec::new()] },
                Side { store: redis, clock: redis_clock, guards: vec![None, None], fences: [Vec::new(), Vec::new()] },
            ];
            for (i, step) in steps.iter().enumerate() {
                // Every step takes a millisecond, as real calls take time: the
                // fencing token after a deleted record relies on the clock
                // having moved since the last grant (see the README).
                for side in &sides {
                    side.clock.advance(Duration::from_millis(1)).await;
                }
                let a = sides[0].apply(step).await;
                let b = sides[1].apply(step).await;
                if a != b {
                    return Err(format!("step {i} {step:?}: memory {a:?}, redis {b:?}"));
                }
            }
            // Both announced the same wake-ups, in the same order: a waiter
            // reacts to each, so the twin must send what the scripts PUBLISH.
            // The twin's are all there; Redis pushes its own, so wait for as
            // many (up to 2 s, for a loaded machine), then 50 ms for extras.
            for (i, id) in IDS.iter().enumerate() {
                let memory_heard = heard[0][i].take();
                let mut redis_heard = heard[1][i].take();
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                while redis_heard.len() < memory_heard.len() && std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    redis_heard.extend(heard[1][i].take());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                redis_heard.extend(heard[1][i].take());
                if memory_heard != redis_heard {
                    return Err(format!("wake-ups for {id}: memory {memory_heard:?}, redis {redis_heard:?}"));
                }
            }
            // Each conversation's fencing tokens grew on both sides.
            for side in &sides {
                for fences in &side.fences {
                    if fences.windows(2).any(|w| w[0] >= w[1]) {
                        return Err(format!("fencing tokens did not grow: {fences:?}"));
                    }
                }
            }
            for side in &mut sides {
                for guard in side.guards.iter_mut() {
                    if let Some(g) = guard.take() {
                        std::mem::forget(g);
                    }
                }
                for id in IDS {
                    side.store.delete_lock(id).await.unwrap();
                }
            }
            Ok(())
        });
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

/// Grants within one tick of the clock (the manual clocks never move here):
/// each still gets a fencing token above the last, on both stores. On Redis
/// that is the `previous + 1` branch of `next_fence` in lua/common.lua, which
/// real time reaches only when two grants fall in one microsecond.
#[test]
fn fencing_tokens_grow_over_grants_within_one_clock_tick() {
    let rt = runtime();
    let url = support::redis_url();
    rt.block_on(async move {
        let prefix = support::unique_prefix("tick");
        let ((memory, _memory_clock), (redis, _redis_clock)) =
            manual_clock_stores(&url, &prefix).await.unwrap();
        for (side, store) in [("memory", memory), ("redis", redis)] {
            let lifetime = Duration::from_secs(10);
            for expected in 0..5 {
                assert_eq!(
                    store.issue_ticket("tick", lifetime).await.unwrap(),
                    expected
                );
            }
            let mut fences = Vec::new();
            for ticket in 0..5 {
                let record = store.inspect("tick").await.unwrap().record.unwrap();
                assert_eq!(record.served, Some(ticket), "{side}");
                fences.push(record.fence.unwrap());
                // Each finish grants the next ticket at the same instant.
                store.finish_serving("tick", ticket).await.unwrap();
            }
            assert!(
                fences.windows(2).all(|w| w[0] < w[1]),
                "{side}: fencing tokens within one tick: {fences:?}"
            );
            // And a guard's token, granted in that tick too, is above them all.
            let guard = store
                .lock_with("tick", LockOptions::default().with_timeout(Duration::ZERO))
                .await
                .unwrap();
            assert!(guard.fencing_token() > *fences.last().unwrap(), "{side}");
            std::mem::forget(guard);
            store.delete_lock("tick").await.unwrap();
        }
    });
}

/// A ticket is live up to and including the instant it expires, for every
/// script that drops expired tickets: on the manual clock the expiry falls
/// exactly on "now", which real time almost never hits.
#[test]
fn a_ticket_expiring_now_is_still_live() {
    let rt = runtime();
    let url = support::redis_url();
    rt.block_on(async move {
        let prefix = support::unique_prefix("boundary");
        let ((memory, memory_clock), (redis, redis_clock)) =
            manual_clock_stores(&url, &prefix).await.unwrap();
        for (side, store, clock) in [
            ("memory", memory, memory_clock),
            ("redis", redis, redis_clock),
        ] {
            let lifetime = Duration::from_millis(100);
            assert_eq!(store.issue_ticket("edge", lifetime).await.unwrap(), 0);
            assert_eq!(store.issue_ticket("edge", lifetime).await.unwrap(), 1);
            clock.advance(lifetime).await;
            store.update_lock("edge").await.unwrap();
            let lock = store.get_lock("edge").await.unwrap();
            let numbers: Vec<u64> = lock
                .as_ref()
                .map(|l| l.tickets().iter().map(Ticket::number).collect())
                .unwrap_or_default();
            assert_eq!(
                numbers,
                [0, 1],
                "{side}: update_lock dropped tickets expiring now"
            );
            clock.advance(Duration::from_millis(1)).await;
            store.update_lock("edge").await.unwrap();
            let lock = store.get_lock("edge").await.unwrap();
            assert!(
                lock.is_none_or(|l| l.tickets().is_empty()),
                "{side}: a millisecond later both are expired"
            );
            store.delete_lock("edge").await.unwrap();
        }
    });
}
