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

/// One conversation: what Redis keeps in its meta hash and two sorted sets.
#[derive(Debug)]
struct Conversation {
    epoch: u64,
    next: u64,
    /// number -> expiry: the queue in serving order.
    queue: BTreeMap<u64, Instant>,
    /// (expiry, number): pruning takes expired tickets off the front.
    by_expiry: BTreeSet<(Instant, u64)>,
    /// When the "keys" vanish, as Redis's PEXPIREAT would make them.
    keys_expire: Instant,
}

impl Conversation {
    fn head(&self) -> Option<u64> {
        self.queue.keys().next().copied()
    }

    fn remaining(&self, number: u64, now: Instant) -> Option<Duration> {
        let at = *self.queue.get(&number)?;
        (at >= now).then(|| at - now)
    }

    fn insert(&mut self, number: u64, expires: Instant) {
        if let Some(old) = self.queue.insert(number, expires) {
            self.by_expiry.remove(&(old, number));
        }
        self.by_expiry.insert((expires, number));
    }

    fn remove(&mut self, number: u64) -> bool {
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
            self.by_expiry.pop_first();
            self.queue.remove(&number);
            pruned += 1;
        }
        pruned
    }

    /// common.lua `touch`.
    fn touch(&mut self) {
        if let Some(&(latest, _)) = self.by_expiry.last() {
            self.keys_expire = latest + KEY_TTL_MARGIN;
        }
    }
}

/// common.lua `announce`.
fn announce(
    epoch: u64,
    before: Option<u64>,
    after: Option<u64>,
    quiet: Option<u64>,
    removed: Option<u64>,
) -> Option<Notice> {
    let head_moved = after != before && (after.is_none() || after != quiet);
    (removed.is_some() || head_moved).then_some(Notice::Changed {
        epoch,
        serving: after,
        removed,
    })
}

/// All conversations of one in-memory store.
#[derive(Debug, Default)]
pub(crate) struct State {
    conversations: HashMap<String, Conversation>,
    /// (keys_expire, id) for every conversation: lets expired records go
    /// without a scan, as Redis's own key expiry does.
    expiries: BTreeSet<(Instant, String)>,
    last_epoch: u64,
}

impl State {
    /// Drops the records whose keys would have expired in Redis.
    fn expire_records(&mut self, now: Instant) {
        while let Some((at, cid)) = self.expiries.first().cloned() {
            if at > now {
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

    fn get(&mut self, cid: &str, now: Instant) -> Option<&mut Conversation> {
        self.expire_records(now);
        self.conversations.get_mut(cid)
    }

    /// Re-files a conversation's key expiry after `touch` may have moved it.
    fn refile(&mut self, cid: &str, before: Option<Instant>) {
        let Some(after) = self.conversations.get(cid).map(|c| c.keys_expire) else {
            return;
        };
        if before != Some(after) {
            if let Some(before) = before {
                self.expiries.remove(&(before, cid.to_owned()));
            }
            self.expiries.insert((after, cid.to_owned()));
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
        now: Instant,
    ) -> (Issued, Option<Notice>) {
        self.expire_records(now);
        let keys_before = self.conversations.get(cid).map(|c| c.keys_expire);
        if keys_before.is_none() {
            self.last_epoch += 1;
            let fresh = Conversation {
                epoch: self.last_epoch,
                next: 0,
                queue: BTreeMap::new(),
                by_expiry: BTreeSet::new(),
                keys_expire: now,
            };
            self.conversations.insert(cid.to_owned(), fresh);
        }
        let c = self.conversations.get_mut(cid).expect("inserted above");
        let before = c.head();
        c.prune(now);
        let ticket = c.next;
        c.next += 1;
        c.insert(ticket, now + lifetime);
        c.touch();
        let after = c.head().expect("the new ticket is live");
        let reply = Issued {
            ticket,
            epoch: c.epoch,
            now_serving: after,
            head_remaining: c.remaining(after, now),
        };
        let notice = announce(c.epoch, before, Some(after), Some(ticket), None);
        self.refile(cid, keys_before);
        (reply, notice)
    }

    /// lua/poll.lua
    pub(crate) fn poll(
        &mut self,
        cid: &str,
        ticket: TicketRef,
        now: Instant,
    ) -> (Polled, Option<Notice>) {
        let Some(c) = self.get(cid, now) else {
            return (Polled::Gone, None);
        };
        let before = c.head();
        c.prune(now);
        let after = c.head();
        let notice = announce(c.epoch, before, after, Some(ticket.number), None);
        let own = c.remaining(ticket.number, now);
        let polled = match own {
            Some(_) if ticket.epoch.is_some_and(|e| e != c.epoch) => Polled::Gone,
            None => Polled::Gone,
            Some(_) if after == Some(ticket.number) => Polled::Served,
            Some(own_remaining) => Polled::Waiting {
                ahead: c.queue.range(..ticket.number).count() as u64,
                head_remaining: after.and_then(|h| c.remaining(h, now)),
                own_remaining,
            },
        };
        (polled, notice)
    }

    /// lua/release.lua
    pub(crate) fn release(
        &mut self,
        cid: &str,
        ticket: TicketRef,
        mode: ReleaseMode,
        now: Instant,
    ) -> (Released, Option<Notice>) {
        let Some(c) = self.get(cid, now) else {
            return (
                Released {
                    removed: false,
                    now_serving: None,
                },
                None,
            );
        };
        let before = c.head();
        let removed = ticket.epoch.is_none_or(|e| e == c.epoch) && c.remove(ticket.number);
        c.prune(now);
        let after = c.head();
        if after.is_none() && mode == ReleaseMode::Cleanup {
            self.drop_record(cid);
            return (
                Released {
                    removed,
                    now_serving: None,
                },
                None,
            );
        }
        let keys_before = Some(c.keys_expire);
        c.touch();
        let waiter = (removed && before != Some(ticket.number)).then_some(ticket.number);
        let notice = announce(c.epoch, before, after, None, waiter);
        self.refile(cid, keys_before);
        (
            Released {
                removed,
                now_serving: after,
            },
            notice,
        )
    }

    /// lua/read.lua
    pub(crate) fn read(&mut self, cid: &str, limit: Option<u64>, now: Instant) -> Option<Record> {
        let c = self.get(cid, now)?;
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
        Some(Record {
            next: c.next,
            epoch: c.epoch,
            live: count,
            tickets: listed,
        })
    }

    /// lua/save.lua
    pub(crate) fn save(
        &mut self,
        lock: &TicketLock,
        now: Instant,
    ) -> (Option<u64>, Option<Notice>) {
        self.expire_records(now);
        let cid = lock.conversation_id();
        let mut next_min = lock.next_number();
        let saved: Vec<&Ticket> = lock
            .tickets()
            .iter()
            .filter(|t| !t.expires_in().is_zero())
            .collect();
        let existing = self.conversations.get_mut(cid);
        if existing.is_none() && saved.is_empty() {
            return (None, None);
        }
        let keys_before = existing.as_ref().map(|c| c.keys_expire);
        if existing.is_none() {
            self.last_epoch += 1;
            let fresh = Conversation {
                epoch: self.last_epoch,
                next: 0,
                queue: BTreeMap::new(),
                by_expiry: BTreeSet::new(),
                keys_expire: now,
            };
            self.conversations.insert(cid.to_owned(), fresh);
        }
        let c = self.conversations.get_mut(cid).expect("present");
        let before = c.head();
        c.queue.clear();
        c.by_expiry.clear();
        for t in saved {
            c.insert(t.number(), now + t.expires_in());
            next_min = next_min.max(t.number() + 1);
        }
        c.next = c.next.max(next_min);
        c.touch();
        let after = c.head();
        let notice = announce(c.epoch, before, after, None, None);
        self.refile(cid, keys_before);
        (after, notice)
    }

    /// lua/delete.lua
    pub(crate) fn delete(&mut self, cid: &str, now: Instant) -> (bool, Option<Notice>) {
        self.expire_records(now);
        match self.drop_record(cid) {
            Some(_) => (true, Some(Notice::Recheck)),
            None => (false, None),
        }
    }

    /// lua/update.lua
    pub(crate) fn update(&mut self, cid: &str, now: Instant) -> (Updated, Option<Notice>) {
        let Some(c) = self.get(cid, now) else {
            return (
                Updated {
                    pruned: 0,
                    now_serving: None,
                },
                None,
            );
        };
        let before = c.head();
        let pruned = c.prune(now);
        let after = c.head();
        (
            Updated {
                pruned,
                now_serving: after,
            },
            announce(c.epoch, before, after, None, None),
        )
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
}

/// The in-memory backend: [`State`] behind a mutex plus direct wake-ups.
#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryBackend {
    shared: Arc<Shared>,
}

impl MemoryBackend {
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
        let (reply, notice) = step(&mut state, Instant::now());
        if let Some(notice) = notice {
            self.shared.notifier.send(cid, notice);
        }
        reply
    }
}

impl Backend for MemoryBackend {
    async fn issue(&self, cid: &str, lifetime_ms: u64) -> Result<Issued> {
        Ok(self.run(cid, |s, now| {
            s.issue(cid, Duration::from_millis(lifetime_ms), now)
        }))
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
        s.issue("c", Duration::from_millis(100), t0);
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
        let (first, _) = s.issue("c", Duration::from_millis(10), t0);
        let (second, _) = s.issue("c", Duration::from_millis(1000), t0);
        assert_eq!(second.now_serving, first.ticket);
        let (polled, notice) = s.poll(
            "c",
            TicketRef {
                number: 1,
                epoch: Some(first.epoch),
            },
            at(t0, 11),
        );
        assert_eq!(polled, Polled::Served);
        // The poller learns from its reply; nobody else needs telling.
        assert_eq!(notice, None);
        let (_, notice) = s.issue("c", Duration::from_millis(1000), at(t0, 12));
        assert_eq!(notice, None);
    }
}
