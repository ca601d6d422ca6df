//! The in-memory backend: the ticket-queue rules of `lua/` as a synchronous
//! state machine behind a mutex, with the same names, replies and wake-ups.
//!
//! Each transition mirrors one script (named in its doc) line for line in
//! intent: prune expired tickets first, then decide, then announce the new
//! head. Time is tokio's monotonic clock, so a paused test runtime can drive it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Backend, Issued, Polled, Record, ReleaseMode, Released, Result, Subscription, TicketRef,
    Updated, KEY_TTL_MARGIN,
};
use crate::notify::{Notice, Notifier};
use crate::ticket::{Ticket, TicketLock};

/// Lease terms of a renewing ticket (common.lua `l<n>`).
#[derive(Debug, Clone, Copy)]
struct Terms {
    lease: Duration,
    liveness: Duration,
}

/// One conversation: what Redis keeps in its meta hash and two sorted sets.
#[derive(Debug)]
struct Conversation {
    epoch: u64,
    next: u64,
    /// number -> expiry: the queue in serving order.
    queue: BTreeMap<u64, Instant>,
    /// (expiry, number): pruning takes expired tickets off the front.
    by_expiry: BTreeSet<(Instant, u64)>,
    /// Renewing tickets' terms.
    terms: HashMap<u64, Terms>,
    /// The ticket granted last, when, and its fencing token.
    served: Option<(u64, Instant, u64)>,
    /// Equals the served ticket once its owner picked the grant up.
    held: Option<u64>,
    /// When the "keys" vanish, as Redis's PEXPIREAT would make them.
    keys_expire: Instant,
}

impl Conversation {
    fn new(epoch: u64, now: Instant) -> Self {
        Conversation {
            epoch,
            next: 0,
            queue: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            terms: HashMap::new(),
            served: None,
            held: None,
            keys_expire: now,
        }
    }

    fn head(&self) -> Option<u64> {
        self.queue.keys().next().copied()
    }

    fn remaining(&self, number: u64, now: Instant) -> Option<Duration> {
        let at = *self.queue.get(&number)?;
        (at >= now).then(|| at - now)
    }

    fn fence(&self) -> Option<u64> {
        self.served.map(|(_, _, fence)| fence)
    }

    fn set_expiry(&mut self, number: u64, expires: Instant) {
        if let Some(old) = self.queue.insert(number, expires) {
            self.by_expiry.remove(&(old, number));
        }
        self.by_expiry.insert((expires, number));
    }

    /// common.lua `remove`, for one ticket.
    fn remove(&mut self, number: u64) -> bool {
        self.terms.remove(&number);
        match self.queue.remove(&number) {
            Some(at) => self.by_expiry.remove(&(at, number)),
            None => false,
        }
    }

    /// common.lua `prune`: expired means expiry < now.
    fn prune(&mut self, now: Instant) -> u64 {
        let mut pruned = 0;
        while let Some(&(at, number)) = self.by_expiry.first() {
            if at >= now {
                break;
            }
            self.remove(number);
            pruned += 1;
        }
        pruned
    }

    /// common.lua `grant`.
    fn grant(&mut self, head: Option<u64>, now: Instant, fences: &mut u64) {
        let Some(head) = head else { return };
        if self.served.is_some_and(|(served, _, _)| served == head) {
            return;
        }
        *fences += 1;
        self.served = Some((head, now, *fences));
        self.held = None;
    }

    /// common.lua `confirm`.
    fn confirm(&mut self, ticket: u64) {
        if self.held == Some(ticket) {
            return;
        }
        if let (Some(terms), Some((_, served_at, _))) =
            (self.terms.get(&ticket).copied(), self.served)
        {
            self.set_expiry(ticket, served_at + terms.lease);
        }
        self.held = Some(ticket);
    }

    /// common.lua `touch`.
    fn touch(&mut self) {
        if let Some(&(latest, _)) = self.by_expiry.last() {
            self.keys_expire = latest + KEY_TTL_MARGIN;
        }
    }

    /// common.lua `settle`: grant, touch, announce; returns the head.
    fn settle(
        &mut self,
        before: Option<u64>,
        now: Instant,
        fences: &mut u64,
        quiet: Option<u64>,
        removed: Option<u64>,
    ) -> (Option<u64>, Option<Notice>) {
        let after = self.head();
        self.grant(after, now, fences);
        self.touch();
        let head_moved = after != before && (after.is_none() || after != quiet);
        let notice = (removed.is_some() || head_moved).then(|| Notice::Changed {
            epoch: self.epoch,
            serving: after,
            fence: after.and(self.fence()),
            removed,
            serving_left: after.and_then(|h| self.remaining(h, now)),
        });
        (after, notice)
    }
}

/// All conversations of one in-memory store.
#[derive(Debug, Default)]
pub(crate) struct State {
    conversations: HashMap<String, Conversation>,
    /// (keys_expire, id) for every conversation: lets expired records go
    /// without a scan, as Redis's own key expiry does.
    expiries: BTreeSet<(Instant, String)>,
    last_epoch: u64,
    /// Fencing tokens are store-wide here, so they grow across deleted and
    /// expired records as Redis's clock-based ones do.
    last_fence: u64,
}

impl State {
    /// Drops the records whose keys would have expired in Redis.
    fn expire_records(&mut self, now: Instant) {
        while let Some((at, cid)) = self.expiries.first().cloned() {
            // Redis drops a key once its expiry time has passed (now > at).
            if at >= now {
                break;
            }
            self.expiries.pop_first();
            if self
                .conversations
                .get(&cid)
                .is_some_and(|c| c.keys_expire == at)
            {
                self.conversations.remove(&cid);
            }
        }
    }

    /// Runs `step` on `cid`'s record (after expiring old records) and
    /// re-files the record's key expiry, which the step may have moved.
    fn with<T>(
        &mut self,
        cid: &str,
        now: Instant,
        step: impl FnOnce(&mut Conversation, &mut u64) -> T,
    ) -> Option<T> {
        self.expire_records(now);
        let c = self.conversations.get_mut(cid)?;
        let keys_before = c.keys_expire;
        let out = step(c, &mut self.last_fence);
        let keys_after = c.keys_expire;
        if keys_before != keys_after {
            self.expiries.remove(&(keys_before, cid.to_owned()));
            self.expiries.insert((keys_after, cid.to_owned()));
        }
        Some(out)
    }

    /// Creates `cid`'s record if it has none (lua: `HSETNX meta epoch`).
    fn create(&mut self, cid: &str, now: Instant) {
        self.expire_records(now);
        if !self.conversations.contains_key(cid) {
            self.last_epoch += 1;
            // Filed under its key expiry by `with`, once the step has set one.
            self.conversations
                .insert(cid.to_owned(), Conversation::new(self.last_epoch, now));
        }
    }

    fn drop_record(&mut self, cid: &str) -> Option<Conversation> {
        let c = self.conversations.remove(cid)?;
        self.expiries.remove(&(c.keys_expire, cid.to_owned()));
        Some(c)
    }

    /// lua/issue.lua
    pub(crate) fn issue(
        &mut self,
        cid: &str,
        lifetime: Duration,
        liveness: Option<Duration>,
        now: Instant,
    ) -> (Issued, Option<Notice>) {
        self.create(cid, now);
        self.with(cid, now, |c, fences| {
            let before = c.head();
            c.prune(now);
            let ticket = c.next;
            c.next += 1;
            match liveness {
                Some(liveness) => {
                    c.terms.insert(
                        ticket,
                        Terms {
                            lease: lifetime,
                            liveness,
                        },
                    );
                    c.set_expiry(ticket, now + liveness);
                }
                None => c.set_expiry(ticket, now + lifetime),
            }
            let (after, notice) = c.settle(before, now, fences, Some(ticket), None);
            let after = after.expect("the new ticket is live");
            let mut fence = None;
            if after == ticket {
                c.confirm(ticket);
                c.touch();
                fence = c.fence();
            }
            let reply = Issued {
                ticket,
                epoch: c.epoch,
                now_serving: after,
                head_remaining: c.remaining(after, now),
                fence,
            };
            (reply, notice)
        })
        .expect("created above")
    }

    /// lua/poll.lua
    pub(crate) fn poll(
        &mut self,
        cid: &str,
        ticket: TicketRef,
        now: Instant,
    ) -> (Polled, Option<Notice>) {
        self.with(cid, now, |c, fences| {
            let before = c.head();
            c.prune(now);
            let (after, notice) = c.settle(before, now, fences, Some(ticket.number), None);
            let gone = ticket.epoch.is_some_and(|e| e != c.epoch)
                || c.remaining(ticket.number, now).is_none();
            if gone {
                return (Polled::Gone, notice);
            }
            if after == Some(ticket.number) {
                c.confirm(ticket.number);
                c.touch();
                let fence = c.fence().expect("granted");
                return (Polled::Served { fence }, notice);
            }
            if let Some(terms) = c.terms.get(&ticket.number).copied() {
                c.set_expiry(ticket.number, now + terms.liveness);
                c.touch();
            }
            let polled = Polled::Waiting {
                ahead: c.queue.range(..ticket.number).count() as u64,
                head_remaining: after.and_then(|h| c.remaining(h, now)),
                own_remaining: c.remaining(ticket.number, now).expect("live"),
            };
            (polled, notice)
        })
        .unwrap_or((Polled::Gone, None))
    }

    /// lua/release.lua
    pub(crate) fn release(
        &mut self,
        cid: &str,
        ticket: TicketRef,
        mode: ReleaseMode,
        now: Instant,
    ) -> (Released, Option<Notice>) {
        let Some((before, removed, emptied)) = self.with(cid, now, |c, _| {
            let before = c.head();
            // Prune first: an expired ticket counts as not removed.
            c.prune(now);
            let removed = ticket.epoch.is_none_or(|e| e == c.epoch) && c.remove(ticket.number);
            (before, removed, c.head().is_none())
        }) else {
            return (
                Released {
                    removed: false,
                    now_serving: None,
                },
                None,
            );
        };
        if emptied && mode == ReleaseMode::Cleanup {
            self.drop_record(cid);
            return (
                Released {
                    removed,
                    now_serving: None,
                },
                None,
            );
        }
        self.with(cid, now, |c, fences| {
            // A removed waiter (not the served ticket) is named, or it would
            // only find out at its next check.
            let waiter = (removed && before != Some(ticket.number)).then_some(ticket.number);
            let (after, notice) = c.settle(before, now, fences, None, waiter);
            (
                Released {
                    removed,
                    now_serving: after,
                },
                notice,
            )
        })
        .expect("the record exists")
    }

    /// lua/extend.lua
    pub(crate) fn extend(
        &mut self,
        cid: &str,
        ticket: u64,
        fence: u64,
        lease: Duration,
        now: Instant,
    ) -> (Option<Duration>, Option<Notice>) {
        self.with(cid, now, |c, fences| {
            let before = c.head();
            c.prune(now);
            let (after, notice) = c.settle(before, now, fences, None, None);
            if after != Some(ticket) || c.fence() != Some(fence) {
                return (None, notice);
            }
            c.set_expiry(ticket, now + lease);
            c.held = Some(ticket);
            c.touch();
            (Some(lease), notice)
        })
        .unwrap_or((None, None))
    }

    /// lua/read.lua
    pub(crate) fn read(&mut self, cid: &str, limit: Option<u64>, now: Instant) -> Option<Record> {
        self.with(cid, now, |c, _| {
            let live: Vec<Ticket> = c
                .queue
                .iter()
                .filter(|(_, &at)| at >= now)
                .map(|(&n, &at)| Ticket::new(n, at - now))
                .collect();
            let count = live.len() as u64;
            let listed = match limit {
                Some(limit) => live
                    .into_iter()
                    .take(limit.min(usize::MAX as u64) as usize)
                    .collect(),
                None => live,
            };
            Record {
                next: c.next,
                epoch: c.epoch,
                live: count,
                tickets: listed,
            }
        })
    }

    /// lua/save.lua
    pub(crate) fn save(
        &mut self,
        lock: &TicketLock,
        now: Instant,
    ) -> (Option<u64>, Option<Notice>) {
        let cid = lock.conversation_id();
        let saved: Vec<&Ticket> = lock
            .tickets()
            .iter()
            .filter(|t| !t.expires_in().is_zero())
            .collect();
        self.expire_records(now);
        if saved.is_empty() && !self.conversations.contains_key(cid) {
            return (None, None);
        }
        self.create(cid, now);
        self.with(cid, now, |c, fences| {
            let before = c.head();
            c.queue.clear();
            c.by_expiry.clear();
            c.terms.clear();
            let mut next_min = lock.next_number();
            for t in saved {
                c.set_expiry(t.number(), now + t.expires_in());
                next_min = next_min.max(t.number() + 1);
            }
            c.next = c.next.max(next_min);
            c.settle(before, now, fences, None, None)
        })
        .expect("created above")
    }

    /// lua/delete.lua
    pub(crate) fn delete(&mut self, cid: &str, now: Instant) -> (bool, Option<Notice>) {
        self.expire_records(now);
        match self.drop_record(cid) {
            Some(c) => (
                true,
                Some(Notice::Changed {
                    epoch: c.epoch,
                    serving: None,
                    fence: None,
                    removed: None,
                    serving_left: None,
                }),
            ),
            None => (false, None),
        }
    }

    /// lua/update.lua
    pub(crate) fn update(&mut self, cid: &str, now: Instant) -> (Updated, Option<Notice>) {
        self.with(cid, now, |c, fences| {
            let before = c.head();
            let pruned = c.prune(now);
            let (after, notice) = c.settle(before, now, fences, None, None);
            (
                Updated {
                    pruned,
                    now_serving: after,
                },
                notice,
            )
        })
        .unwrap_or((
            Updated {
                pruned: 0,
                now_serving: None,
            },
            None,
        ))
    }

    #[cfg(test)]
    fn record_count(&self) -> usize {
        self.conversations.len()
    }
}

/// Shared by every clone of an in-memory store.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    notifier: Notifier,
    /// Set only by the differential tests: time stands still until they move it.
    manual_clock: Option<Mutex<Instant>>,
}

/// The in-memory backend: [`State`] behind a mutex plus direct wake-ups.
#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryBackend {
    shared: Arc<Shared>,
}

impl MemoryBackend {
    /// A backend whose clock only moves by [`advance`](Self::advance) (tests only).
    pub(crate) fn with_manual_clock() -> Self {
        MemoryBackend {
            shared: Arc::new(Shared {
                manual_clock: Some(Mutex::new(Instant::now())),
                ..Shared::default()
            }),
        }
    }

    /// Moves a manual clock forward; the real clock cannot be moved.
    pub(crate) fn advance(&self, by: Duration) {
        if let Some(clock) = &self.shared.manual_clock {
            *clock.lock().unwrap_or_else(|p| p.into_inner()) += by;
        }
    }

    fn now(&self) -> Instant {
        match &self.shared.manual_clock {
            Some(clock) => *clock.lock().unwrap_or_else(|p| p.into_inner()),
            None => Instant::now(),
        }
    }

    /// Runs one transition and sends its notice while still holding the state
    /// lock, so waiters see notices in the order the transitions happened.
    fn run<T>(
        &self,
        cid: &str,
        step: impl FnOnce(&mut State, Instant) -> (T, Option<Notice>),
    ) -> T {
        // Transitions never panic half-way through a change (they validate
        // first), so a poisoned lock still guards consistent state.
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let (reply, notice) = step(&mut state, self.now());
        if let Some(notice) = notice {
            self.shared.notifier.send(cid, notice);
        }
        reply
    }
}

impl Backend for MemoryBackend {
    async fn issue(&self, cid: &str, lifetime_ms: u64, liveness_ms: Option<u64>) -> Result<Issued> {
        let lifetime = Duration::from_millis(lifetime_ms);
        let liveness = liveness_ms.map(Duration::from_millis);
        Ok(self.run(cid, |s, now| s.issue(cid, lifetime, liveness, now)))
    }

    async fn extend(
        &self,
        cid: &str,
        ticket: u64,
        fence: u64,
        lease_ms: u64,
    ) -> Result<Option<Duration>> {
        let lease = Duration::from_millis(lease_ms);
        Ok(self.run(cid, |s, now| s.extend(cid, ticket, fence, lease, now)))
    }

    async fn poll(&self, cid: &str, ticket: TicketRef) -> Result<Polled> {
        Ok(self.run(cid, |s, now| s.poll(cid, ticket, now)))
    }

    async fn release(&self, cid: &str, ticket: TicketRef, mode: ReleaseMode) -> Result<Released> {
        Ok(self.run(cid, |s, now| s.release(cid, ticket, mode, now)))
    }

    async fn read(&self, cid: &str, limit: Option<u64>) -> Result<Option<Record>> {
        Ok(self.run(cid, |s, now| (s.read(cid, limit, now), None)))
    }

    async fn save(&self, lock: &TicketLock) -> Result<Option<u64>> {
        Ok(self.run(lock.conversation_id(), |s, now| s.save(lock, now)))
    }

    async fn delete(&self, cid: &str) -> Result<bool> {
        Ok(self.run(cid, |s, now| s.delete(cid, now)))
    }

    async fn update(&self, cid: &str) -> Result<Updated> {
        Ok(self.run(cid, |s, now| s.update(cid, now)))
    }

    async fn subscribe(&self, cid: &str) -> Result<Subscription> {
        let (notices, _) = self.shared.notifier.join(cid);
        let shared = self.shared.clone();
        let cid = cid.to_owned();
        Ok(Subscription {
            notices,
            on_drop: Some(Box::new(move || {
                if shared.notifier.leave(&cid) {
                    shared.notifier.forget_if_idle(&cid);
                }
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn records_vanish_a_margin_after_their_last_expiry() {
        let mut s = State::default();
        let t0 = Instant::now();
        s.issue("c", Duration::from_millis(100), None, t0);
        s.release(
            "c",
            TicketRef {
                number: 0,
                epoch: None,
            },
            ReleaseMode::Finish,
            at(t0, 10),
        );
        assert!(s.read("c", None, at(t0, 1099)).is_some());
        assert!(s.read("c", None, at(t0, 1101)).is_none());
        assert_eq!(s.record_count(), 0);
    }

    #[test]
    fn an_expired_head_is_pruned_and_its_successor_announced() {
        let mut s = State::default();
        let t0 = Instant::now();
        let (first, _) = s.issue("c", Duration::from_millis(10), None, t0);
        let (second, _) = s.issue("c", Duration::from_millis(1000), None, t0);
        assert_eq!(second.now_serving, first.ticket);
        let (polled, notice) = s.poll(
            "c",
            TicketRef {
                number: 1,
                epoch: Some(first.epoch),
            },
            at(t0, 11),
        );
        assert!(matches!(polled, Polled::Served { .. }), "{polled:?}");
        // The poller learns from its reply; nobody else needs telling.
        assert_eq!(notice, None);
        let (_, notice) = s.issue("c", Duration::from_millis(1000), None, at(t0, 12));
        assert_eq!(notice, None);
    }
}
