//! The in-memory backend: the ticket-queue rules of `lua/` as a synchronous
//! state machine behind a mutex, with the same names, replies and wake-ups.
//!
//! Each transition mirrors one script (named in its doc): read, decide, then
//! write and announce, with the same helpers as lua/common.lua (`scan`,
//! `grant`, `settle`, `confirm`, `leave`). Time is tokio's monotonic clock,
//! so a paused test runtime can drive it; a manual clock serves the
//! differential tests, which compare every reply with the scripts'.
//!
//! Every call answers at once (nothing awaits), so the store needs no task of
//! its own to make a call cancel-safe.
//!
//! Longer than the crate's other files on purpose: one transition per script
//! and one helper per common.lua helper, kept side by side as lua/ keeps them,
//! so a rule and its twin are read (and mutation-tested) together.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Backend, Fault, IssueArgs, Issued, Polled, Record, ReleaseMode, Released, Removal, Remover,
    Renewal, Result, Subscription, TicketRef, Updated, KEY_TTL_MARGIN, MAX_TICKET,
};
use crate::inspect::{InspectedRecord, InspectedTicket, Inspection};
use crate::notify::{Notice, Notifier, Removed};
use crate::ticket::{Ticket, TicketLock};

/// One ticket (common.lua `t<k>`). `lease` and `liveness` are zero for a
/// fixed ticket.
#[derive(Debug, Clone)]
struct Entry {
    at: Instant,
    lease: Duration,
    liveness: Duration,
    request: Option<Arc<str>>,
}

/// A conversation's record: the fields of its hash.
#[derive(Debug)]
struct Conversation {
    epoch: u64,
    /// `n`: the number the next ticket gets.
    next: u64,
    /// `h`: every ticket below it is gone.
    cursor: u64,
    /// `s` and `f`: the ticket granted last and that grant's fencing token.
    served: Option<u64>,
    fence: u64,
    /// `g`: when that grant was made, while its owner has not picked it up.
    granted: Option<Instant>,
    tickets: Tickets,
}

/// A conversation's tickets by number: a sorted ring buffer, since tickets
/// come in at the back (numbers only go up) and mostly leave at the front,
/// and one ticket costs one small allocation (a B-tree node is hundreds of
/// bytes).
#[derive(Debug, Default)]
struct Tickets(VecDeque<(u64, Entry)>);

impl Tickets {
    fn one(number: u64, e: Entry) -> Self {
        let mut q = VecDeque::with_capacity(1);
        q.push_back((number, e));
        Tickets(q)
    }

    fn position(&self, number: u64) -> std::result::Result<usize, usize> {
        self.0.binary_search_by_key(&number, |(n, _)| *n)
    }

    fn get(&self, number: &u64) -> Option<&Entry> {
        self.position(*number).ok().map(|i| &self.0[i].1)
    }

    fn get_mut(&mut self, number: &u64) -> Option<&mut Entry> {
        self.position(*number).ok().map(|i| &mut self.0[i].1)
    }

    fn contains_key(&self, number: &u64) -> bool {
        self.position(*number).is_ok()
    }

    fn insert(&mut self, number: u64, e: Entry) {
        match self.position(number) {
            Ok(i) => self.0[i].1 = e,
            Err(i) if i == self.0.len() => self.0.push_back((number, e)),
            Err(i) => self.0.insert(i, (number, e)),
        }
    }

    fn remove(&mut self, number: &u64) -> Option<Entry> {
        let i = self.position(*number).ok()?;
        if i == 0 {
            self.0.pop_front().map(|(_, e)| e)
        } else {
            self.0.remove(i).map(|(_, e)| e)
        }
    }

    /// The tickets numbered `from` and up, lowest first.
    fn range(&self, from: std::ops::RangeFrom<u64>) -> impl Iterator<Item = (&u64, &Entry)> {
        let start = self.0.partition_point(|(n, _)| *n < from.start);
        self.0.range(start..).map(|(n, e)| (n, e))
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &Entry)> {
        self.0.iter().map(|(n, e)| (n, e))
    }

    fn keys(&self) -> impl Iterator<Item = &u64> {
        self.0.iter().map(|(n, _)| n)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::ops::Index<&u64> for Tickets {
    type Output = Entry;

    fn index(&self, number: &u64) -> &Entry {
        self.get(number).expect("a ticket that is there")
    }
}

/// Everything one Redis key holds: the record, the cancelled requests (`x`),
/// and when the key expires.
#[derive(Debug)]
struct Key {
    /// The conversation id, shared with the map and with the store's tickets.
    name: Arc<str>,
    record: Option<Conversation>,
    cancelled: Vec<(Arc<str>, Instant)>,
    expires: Instant,
}

impl Conversation {
    /// common.lua `parse`: a grant not picked up yet ends at its waiting
    /// expiry or when its lease from the grant would, whichever is first.
    fn effective(&self, number: u64, e: &Entry) -> Instant {
        match self.granted {
            Some(g) if self.served == Some(number) && !e.lease.is_zero() => e.at.min(g + e.lease),
            _ => e.at,
        }
    }

    /// common.lua `scan`: the lowest live ticket from the cursor on,
    /// skipping `leaving`; the expired ones met before it are returned too.
    fn scan(&self, now: Instant, leaving: Option<u64>) -> (Option<(u64, Instant)>, Vec<u64>) {
        let mut dead = Vec::new();
        for (&number, e) in self.tickets.range(self.cursor..) {
            if Some(number) == leaving {
                continue;
            }
            let at = self.effective(number, e);
            if at >= now {
                return (Some((number, at)), dead);
            }
            dead.push(number);
        }
        (None, dead)
    }

    /// common.lua `grant`; true when a new grant was made.
    fn grant(&mut self, head: Option<u64>, now: Instant, fences: &mut u64) -> bool {
        let Some(head) = head else {
            self.cursor = self.next;
            return false;
        };
        self.cursor = head;
        if self.served == Some(head) {
            return false;
        }
        *fences += 1;
        self.served = Some(head);
        self.fence = *fences;
        self.granted = Some(now);
        true
    }

    /// common.lua `settle`: drop the expired tickets in front, grant the head.
    fn settle(
        &mut self,
        now: Instant,
        fences: &mut u64,
        leaving: Option<u64>,
    ) -> (Option<(u64, Instant)>, bool) {
        let (head, dead) = self.scan(now, leaving);
        for number in dead {
            self.tickets.remove(&number);
        }
        let granted = self.grant(head.map(|(h, _)| h), now, fences);
        (self.after_grant(head, granted), granted)
    }

    /// A new grant ends when its lease from now would, if that comes first.
    fn after_grant(&self, head: Option<(u64, Instant)>, granted: bool) -> Option<(u64, Instant)> {
        match head {
            Some((h, _)) if granted => Some((h, self.effective(h, &self.tickets[&h]))),
            other => other,
        }
    }

    /// common.lua `confirm`: returns the new expiry, and the expiry the key
    /// must now reach, if later than before.
    fn confirm(&mut self, number: u64) -> (Instant, Option<Instant>) {
        let e = self.tickets.get_mut(&number).expect("the head is present");
        let Some(granted) = self.granted.take() else {
            return (e.at, None);
        };
        if e.lease.is_zero() {
            return (e.at, None);
        }
        let stored = e.at;
        e.at = granted + e.lease;
        (e.at, (e.at > stored).then_some(e.at))
    }

    fn announce(&self, serving: Option<(u64, Instant)>, removed: Removed, now: Instant) -> Notice {
        Notice::Changed {
            epoch: self.epoch,
            serving: serving.map(|(h, _)| h),
            fence: serving.map(|_| self.fence),
            removed,
            // As the scripts' `at - now` reads when negative (a saved head
            // whose lease from an earlier grant already ran out): unknown.
            serving_left: serving.and_then(|(_, at)| at.checked_duration_since(now)),
        }
    }
}

/// All conversations of one in-memory store.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// One slot per conversation id seen lately; a slot whose key Redis
    /// would not hold (deleted, expired) stays until the next sweep, so a
    /// conversation locked again and again reuses its slot and its name.
    keys: HashMap<Arc<str>, Key>,
    /// Operations since the last sweep.
    since_sweep: usize,
    last_epoch: u64,
    /// Fencing tokens are store-wide here, so they grow across deleted and
    /// expired records as Redis's clock-based ones do.
    last_fence: u64,
}

impl Key {
    fn absent(name: Arc<str>, now: Instant) -> Key {
        Key {
            name,
            record: None,
            cancelled: Vec::new(),
            expires: now,
        }
    }

    /// Whether Redis would hold this key.
    fn is_present(&self) -> bool {
        self.record.is_some() || !self.cancelled.is_empty()
    }

    /// Redis drops a key once now > its expiry.
    fn expire(&mut self, now: Instant) {
        if self.expires < now {
            self.delete();
        }
    }

    /// Redis `DEL`: what the key held.
    fn delete(&mut self) -> (Option<Conversation>, Vec<(Arc<str>, Instant)>) {
        (self.record.take(), std::mem::take(&mut self.cancelled))
    }

    /// common.lua `expire_at`: the key lives until `at` + the margin at least
    /// (made: a key the script made gets that TTL outright).
    fn expire_at(&mut self, at: Instant, made: bool) {
        let wanted = at + KEY_TTL_MARGIN;
        if made || wanted > self.expires {
            self.expires = wanted;
        }
    }
}

type Step<T> = (T, Option<Notice>);

fn silent<T>(value: T) -> Step<T> {
    (value, None)
}

fn refused(reason: String) -> Fault {
    Fault::Refused(reason)
}

/// Sweep for expired keys no more often than this many operations apart.
const SWEEP_EVERY: usize = 1024;

impl State {
    /// Now and then, drops every slot Redis would not hold, as its
    /// background expiry does: every `max(slots, 1024)` operations, which
    /// costs O(1) per operation and needs no index that every lock would have
    /// to keep up to date. (Each operation expires its own key first.)
    fn sweep(&mut self, now: Instant) {
        self.since_sweep += 1;
        if self.since_sweep >= self.keys.len().max(SWEEP_EVERY) {
            self.since_sweep = 0;
            self.keys.retain(|_, k| {
                k.expire(now);
                k.is_present()
            });
        }
    }

    /// `cid`'s slot, if it has one, with its key expired as Redis would have.
    fn slot(&mut self, cid: &str, now: Instant) -> Option<&mut Key> {
        self.sweep(now);
        let key = self.keys.get_mut(cid)?;
        key.expire(now);
        Some(key)
    }

    /// `cid`'s key, if Redis would hold one.
    fn key(&mut self, cid: &str, now: Instant) -> Option<&mut Key> {
        self.slot(cid, now).filter(|k| k.is_present())
    }

    /// `cid`'s slot, made if it has none (a script about to write the key).
    fn make_key(&mut self, cid: &str, now: Instant) -> &mut Key {
        if !self.keys.contains_key(cid) {
            let name: Arc<str> = Arc::from(cid);
            self.keys.insert(name.clone(), Key::absent(name, now));
        }
        self.keys.get_mut(cid).expect("made above")
    }

    fn new_epoch(&mut self) -> u64 {
        self.last_epoch += 1;
        self.last_epoch
    }

    fn expire_at(&mut self, cid: &str, at: Instant, made: bool) {
        if let Some(key) = self.keys.get_mut(cid) {
            key.expire_at(at, made);
        }
    }

    /// Redis `DEL`.
    fn drop_key(&mut self, cid: &str) -> Option<Key> {
        let key = self.keys.get_mut(cid).filter(|k| k.is_present())?;
        let (record, cancelled) = key.delete();
        Some(Key {
            name: key.name.clone(),
            record,
            cancelled,
            expires: key.expires,
        })
    }

    /// lua/issue.lua. Also returns the conversation id as the store keeps it.
    pub(crate) fn issue(
        &mut self,
        cid: &str,
        lifetime: Duration,
        liveness: Option<Duration>,
        request: Option<&str>,
        now: Instant,
    ) -> Result<Step<(Option<Issued>, Arc<str>)>> {
        self.sweep(now);
        let State {
            keys,
            last_epoch,
            last_fence,
            ..
        } = self;
        let counters = (last_epoch, last_fence);
        // One lookup when the conversation has a slot (the common case: a
        // conversation locked again and again).
        if let Some(key) = keys.get_mut(cid) {
            key.expire(now);
            return Self::issue_into(key, counters, lifetime, liveness, request, now);
        }
        let name: Arc<str> = Arc::from(cid);
        let key = keys
            .entry(name.clone())
            .or_insert_with(|| Key::absent(name, now));
        Self::issue_into(key, counters, lifetime, liveness, request, now)
    }

    fn issue_into(
        key: &mut Key,
        (last_epoch, fences): (&mut u64, &mut u64),
        lifetime: Duration,
        liveness: Option<Duration>,
        request: Option<&str>,
        now: Instant,
    ) -> Result<Step<(Option<Issued>, Arc<str>)>> {
        let name = key.name.clone();
        if let Some(request) = request {
            if take_cancelled(&mut key.cancelled, request, now) {
                return Ok(silent((None, name)));
            }
        }
        let liveness = liveness.unwrap_or(Duration::ZERO);
        let held = Entry {
            at: now + lifetime,
            lease: if liveness.is_zero() {
                Duration::ZERO
            } else {
                lifetime
            },
            liveness,
            request: request.map(Arc::from),
        };
        let made = !key.is_present();
        let Some(c) = key.record.as_mut() else {
            *last_epoch += 1;
            *fences += 1;
            let at = held.at;
            key.record = Some(Conversation {
                epoch: *last_epoch,
                next: 1,
                cursor: 0,
                served: Some(0),
                fence: *fences,
                granted: None,
                tickets: Tickets::one(0, held),
            });
            key.expire_at(at, made);
            let issued = Issued {
                ticket: 0,
                epoch: *last_epoch,
                now_serving: 0,
                head_remaining: Some(lifetime),
                fence: Some(*fences),
            };
            return Ok(silent((Some(issued), name)));
        };
        let number = c.next;
        if number > MAX_TICKET {
            return Err(refused(exhausted(&name)));
        }
        let (head, granted) = c.settle(now, fences, None);
        c.next = number + 1;
        let Some((head, head_at)) = head else {
            let at = held.at;
            c.tickets.insert(number, held);
            c.grant(Some(number), now, fences);
            c.granted = None;
            let issued = Issued {
                ticket: number,
                epoch: c.epoch,
                now_serving: number,
                head_remaining: Some(lifetime),
                fence: Some(c.fence),
            };
            key.expire_at(at, false);
            return Ok(silent((Some(issued), name)));
        };
        let waiting = if liveness.is_zero() {
            Entry {
                at: now + lifetime,
                ..held
            }
        } else {
            Entry {
                at: now + liveness,
                ..held
            }
        };
        let at = waiting.at;
        c.tickets.insert(number, waiting);
        let notice = granted.then(|| c.announce(Some((head, head_at)), Removed::None, now));
        let issued = Issued {
            ticket: number,
            epoch: c.epoch,
            now_serving: head,
            head_remaining: Some(head_at - now),
            fence: None,
        };
        key.expire_at(at, false);
        Ok(((Some(issued), name), notice))
    }

    /// lua/poll.lua
    pub(crate) fn poll(&mut self, cid: &str, ticket: TicketRef, now: Instant) -> Step<Polled> {
        self.slot(cid, now);
        let fences = &mut self.last_fence;
        let Some(c) = self.keys.get_mut(cid).and_then(|k| k.record.as_mut()) else {
            return silent(Polled::Gone);
        };
        let number = ticket.number;
        let mine = c.tickets.get(&number).map(|e| c.effective(number, e));
        let (head, granted) = match mine {
            Some(at) if c.served == Some(number) && at >= now => (Some((number, at)), false),
            _ => c.settle(now, fences, None),
        };
        let gone = ticket.epoch.is_some_and(|e| e != c.epoch) || mine.is_none_or(|at| at < now);
        let mut expiry = None;
        let polled = if gone {
            Polled::Gone
        } else if head.map(|(h, _)| h) == Some(number) {
            let (at, later) = c.confirm(number);
            expiry = later;
            Polled::Served {
                fence: c.fence,
                remaining: at - now,
            }
        } else {
            let e = c.tickets.get_mut(&number).expect("live");
            if !e.liveness.is_zero() {
                e.at = now + e.liveness;
                expiry = Some(e.at);
            }
            let (h, head_at) = head.expect("a live ticket is at or behind the head");
            Polled::Waiting {
                ahead: number - h,
                head_remaining: Some(head_at - now),
                own_remaining: e.at - now,
            }
        };
        let notice = (granted && head.map(|(h, _)| h) != Some(number))
            .then(|| c.announce(head, Removed::None, now));
        if let Some(at) = expiry {
            self.expire_at(cid, at, false);
        }
        (polled, notice)
    }

    /// lua/release.lua
    pub(crate) fn release(
        &mut self,
        cid: &str,
        ticket: TicketRef,
        mode: ReleaseMode,
        by: Remover,
        now: Instant,
    ) -> Step<Released> {
        let not_removed = Released {
            removed: false,
            now_serving: None,
        };
        let Some(key) = self.key(cid, now) else {
            return silent(not_removed);
        };
        let Some(c) = key.record.as_ref() else {
            return silent(not_removed);
        };
        let number = ticket.number;
        let present = ticket.epoch.is_none_or(|e| e == c.epoch) && c.tickets.contains_key(&number);
        let only = present
            && mode == ReleaseMode::Cleanup
            && number == c.cursor
            && c.next == number + 1
            && key.cancelled.is_empty();
        if only {
            let (record, _) = key.delete();
            let c = record.expect("present");
            let at = c.effective(number, &c.tickets[&number]);
            let notice = (c.served == Some(number) && by == Remover::Admin)
                .then(|| c.announce(None, Removed::None, now));
            return (
                Released {
                    removed: at >= now,
                    now_serving: None,
                },
                notice,
            );
        }
        self.leave(cid, present.then_some(number), number, mode, by, now)
    }

    /// lua/common.lua `leave`, the body of release and cancel: removes
    /// `number` (when `present`) and hands the lock on.
    fn leave(
        &mut self,
        cid: &str,
        present: Option<u64>,
        number: u64,
        mode: ReleaseMode,
        by: Remover,
        now: Instant,
    ) -> Step<Released> {
        let fences = &mut self.last_fence;
        let key = self.keys.get_mut(cid).expect("the caller found it");
        let c = key.record.as_mut().expect("the caller found it");
        let mut removed = false;
        let mut was_served = false;
        if let Some(number) = present {
            let e = c.tickets.get(&number).expect("present");
            removed = c.effective(number, e) >= now;
            was_served = c.served == Some(number);
        }
        let before = c.served;
        let (head, granted) = c.settle(now, fences, present);
        if let Some(number) = present {
            c.tickets.remove(&number);
        }
        let owner = by == Remover::Owner;
        if head.is_none() && mode == ReleaseMode::Cleanup {
            let notice = (was_served && !owner).then(|| c.announce(None, Removed::None, now));
            self.drop_record(cid, now);
            return (
                Released {
                    removed,
                    now_serving: None,
                },
                notice,
            );
        }
        let waiter = match present {
            Some(number) if Some(number) != before && !owner => Removed::Ticket(number),
            _ => Removed::None,
        };
        let tell = granted || waiter != Removed::None || (head.is_none() && was_served && !owner);
        let notice = tell.then(|| c.announce(head, waiter, now));
        let _ = number;
        (
            Released {
                removed,
                now_serving: head.map(|(h, _)| h),
            },
            notice,
        )
    }

    /// common.lua `drop`: deletes the record; cancelled requests stay
    /// remembered in a key made anew.
    fn drop_record(&mut self, cid: &str, now: Instant) {
        let Some(key) = self.drop_key(cid) else {
            return;
        };
        let cancelled: Vec<_> = key
            .cancelled
            .into_iter()
            .filter(|(_, until)| *until >= now)
            .collect();
        if let Some(last) = cancelled.iter().map(|(_, until)| *until).max() {
            self.make_key(cid, now).cancelled = cancelled;
            self.expire_at(cid, last, true);
        }
    }

    /// lua/cancel.lua
    pub(crate) fn cancel(
        &mut self,
        cid: &str,
        request: &str,
        remember: Duration,
        now: Instant,
    ) -> Step<Option<u64>> {
        let present = self.key(cid, now).is_some();
        let found = self
            .keys
            .get(cid)
            .and_then(|k| k.record.as_ref())
            .and_then(|c| {
                c.tickets
                    .iter()
                    .find(|(_, e)| e.request.as_deref() == Some(request))
                    .map(|(&n, _)| n)
            });
        if let Some(number) = found {
            let (_, notice) = self.leave(
                cid,
                Some(number),
                number,
                ReleaseMode::Cleanup,
                Remover::Owner,
                now,
            );
            return (Some(number), notice);
        }
        let key = self.make_key(cid, now);
        forget_request(&mut key.cancelled, request, now);
        key.cancelled.push((Arc::from(request), now + remember));
        self.expire_at(cid, now + remember, !present);
        silent(None)
    }

    /// lua/extend.lua
    pub(crate) fn extend(
        &mut self,
        cid: &str,
        ticket: u64,
        fence: u64,
        lease: Duration,
        now: Instant,
    ) -> Step<Option<Duration>> {
        self.slot(cid, now);
        let fences = &mut self.last_fence;
        let Some(c) = self.keys.get_mut(cid).and_then(|k| k.record.as_mut()) else {
            return silent(None);
        };
        let mine = c.tickets.get(&ticket).map(|e| c.effective(ticket, e));
        if let Some(before) =
            mine.filter(|&at| c.served == Some(ticket) && c.fence == fence && at >= now)
        {
            let at = now + lease;
            c.tickets.get_mut(&ticket).expect("present").at = at;
            c.granted = None;
            let notice = (at < before && c.next > ticket + 1)
                .then(|| c.announce(Some((ticket, at)), Removed::None, now));
            self.expire_at(cid, at, false);
            return (Some(lease), notice);
        }
        let (head, granted) = c.settle(now, fences, None);
        let notice = granted.then(|| c.announce(head, Removed::None, now));
        (None, notice)
    }

    /// lua/read.lua
    pub(crate) fn read(&mut self, cid: &str, limit: Option<u64>, now: Instant) -> Option<Record> {
        let c = self.key(cid, now)?.record.as_ref()?;
        if limit == Some(0) {
            let (head, _) = c.scan(now, None);
            return Some(Record {
                next: c.next,
                epoch: c.epoch,
                live: u64::from(head.is_some()),
                tickets: Vec::new(),
            });
        }
        let live: Vec<Ticket> = c
            .tickets
            .iter()
            .filter_map(|(&n, e)| {
                let at = c.effective(n, e);
                (at >= now).then(|| snapshot(n, at - now, e))
            })
            .collect();
        let count = live.len() as u64;
        let tickets = match limit {
            Some(limit) => live
                .into_iter()
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .collect(),
            None => live,
        };
        Some(Record {
            next: c.next,
            epoch: c.epoch,
            live: count,
            tickets,
        })
    }

    /// lua/save.lua
    pub(crate) fn save(&mut self, lock: &TicketLock, now: Instant) -> Step<Option<u64>> {
        let cid = lock.conversation_id();
        let saved: Vec<&Ticket> = lock
            .tickets()
            .iter()
            .filter(|t| !t.expires_in().is_zero())
            .collect();
        let present = self.key(cid, now).is_some();
        let exists = self.keys.get(cid).is_some_and(|k| k.record.is_some());
        if saved.is_empty() && !exists {
            return silent(None);
        }
        if !exists {
            let epoch = self.new_epoch();
            self.make_key(cid, now).record = Some(Conversation {
                epoch,
                next: 0,
                cursor: 0,
                served: None,
                fence: 0,
                granted: None,
                tickets: Tickets::default(),
            });
        }
        let fences = &mut self.last_fence;
        let c = self
            .keys
            .get_mut(cid)
            .and_then(|k| k.record.as_mut())
            .expect("made above");
        let mut removed = Removed::None;
        let mut gone_holder = false;
        let old = std::mem::take(&mut c.tickets);
        for (&number, e) in old.iter() {
            if saved.iter().any(|t| t.number() == number) {
                continue;
            }
            if c.served == Some(number) {
                gone_holder = true;
            } else if c.effective(number, e) >= now {
                removed = match removed {
                    Removed::None => Removed::Ticket(number),
                    _ => Removed::Several,
                };
            }
        }
        let mut next = c.next.max(lock.next_number());
        let mut latest = None;
        for t in &saved {
            let entry = Entry {
                // save.lua takes whole ms, rounded up (see RedisBackend::save).
                at: now + Duration::from_millis(ceil_ms(t.expires_in())),
                lease: t.lease().unwrap_or_default(),
                liveness: t.dead_waiter_timeout().unwrap_or_default(),
                request: old.get(&t.number()).and_then(|e| e.request.clone()),
            };
            latest = latest.max(Some(entry.at));
            next = next.max(t.number() + 1);
            c.tickets.insert(t.number(), entry);
        }
        c.next = next;
        let head = c.tickets.keys().next().copied();
        c.cursor = head.unwrap_or(next);
        let mut granted = false;
        if let Some(head) = head {
            if c.served != Some(head) {
                *fences += 1;
                c.served = Some(head);
                c.fence = *fences;
                c.granted = Some(now);
                granted = true;
            }
        }
        let serving = head.map(|h| (h, c.effective(h, &c.tickets[&h])));
        let tell = granted || removed != Removed::None || (gone_holder && head.is_none());
        let notice = tell.then(|| c.announce(serving, removed, now));
        if let Some(at) = latest {
            self.expire_at(cid, at, !present);
        }
        (head, notice)
    }

    /// lua/delete.lua
    pub(crate) fn delete(&mut self, cid: &str, now: Instant) -> Step<bool> {
        self.slot(cid, now);
        match self.drop_key(cid).and_then(|k| k.record) {
            Some(c) => (true, Some(c.announce(None, Removed::None, now))),
            None => silent(false),
        }
    }

    /// lua/update.lua
    pub(crate) fn update(&mut self, cid: &str, now: Instant) -> Step<Updated> {
        self.slot(cid, now);
        let fences = &mut self.last_fence;
        let Some(c) = self.keys.get_mut(cid).and_then(|k| k.record.as_mut()) else {
            return silent(Updated {
                pruned: 0,
                now_serving: None,
            });
        };
        let dead: Vec<u64> = c
            .tickets
            .iter()
            .filter(|(&n, e)| c.effective(n, e) < now)
            .map(|(&n, _)| n)
            .collect();
        let head = c
            .tickets
            .iter()
            .find(|(&n, e)| c.effective(n, e) >= now)
            .map(|(&n, e)| (n, c.effective(n, e)));
        for n in &dead {
            c.tickets.remove(n);
        }
        let granted = c.grant(head.map(|(h, _)| h), now, fences);
        let head = c.after_grant(head, granted);
        let notice = granted.then(|| c.announce(head, Removed::None, now));
        (
            Updated {
                pruned: dead.len() as u64,
                now_serving: head.map(|(h, _)| h),
            },
            notice,
        )
    }

    /// lua/inspect.lua
    pub(crate) fn inspect(&mut self, cid: &str, limit: Option<u64>, now: Instant) -> Inspection {
        let Some(key) = self.key(cid, now) else {
            return Inspection {
                record: None,
                ttl: None,
                cancelled_requests: 0,
            };
        };
        let ttl = Some(key.expires.saturating_duration_since(now));
        let cancelled = key.cancelled.len() as u64;
        let record = key.record.as_ref().map(|c| {
            let mut live = 0;
            let mut head = None;
            for (&n, e) in c.tickets.iter() {
                if c.effective(n, e) >= now {
                    live += 1;
                    head = head.or(Some(n));
                }
            }
            let listed = usize::try_from(limit.unwrap_or(u64::MAX)).unwrap_or(usize::MAX);
            InspectedRecord {
                next: c.next,
                epoch: c.epoch,
                head,
                served: c.served,
                fence: c.served.map(|_| c.fence),
                granted_ago: c.served.and(c.granted).map(|g| now - g),
                live,
                expired: c.tickets.len() as u64 - live,
                tickets: c
                    .tickets
                    .iter()
                    .take(listed)
                    .map(|(&n, e)| {
                        let at = c.effective(n, e);
                        InspectedTicket {
                            number: n,
                            remaining_ms: if at >= now {
                                millis(at - now) as i64
                            } else {
                                -(millis(now - at) as i64)
                            },
                            lease: (!e.lease.is_zero()).then_some(e.lease),
                            dead_waiter_timeout: (!e.liveness.is_zero()).then_some(e.liveness),
                            request: e.request.as_deref().map(str::to_owned),
                        }
                    })
                    .collect(),
            }
        });
        Inspection {
            record,
            ttl,
            cancelled_requests: cancelled,
        }
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

fn exhausted(cid: &str) -> String {
    format!(
        "conversation {} has issued every ticket number up to {MAX_TICKET}; delete it to start again",
        crate::error::shown(cid)
    )
}

/// issue.lua meeting a cancelled request: true (and the cancelled requests
/// rewritten without it and without the expired ones) when `request` is
/// among them; nothing changes otherwise.
fn take_cancelled(cancelled: &mut Vec<(Arc<str>, Instant)>, request: &str, now: Instant) -> bool {
    if !cancelled.iter().any(|(id, _)| &**id == request) {
        return false;
    }
    forget_request(cancelled, request, now);
    true
}

/// common.lua `forget_request`: drops `request` and the expired entries.
fn forget_request(cancelled: &mut Vec<(Arc<str>, Instant)>, request: &str, now: Instant) {
    cancelled.retain(|(id, until)| &**id != request && *until >= now);
}

/// Whole milliseconds, rounded up: a positive remainder never becomes "expired".
pub(crate) fn ceil_ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// A ticket as read.lua lists it: its terms, and its remaining life.
fn snapshot(number: u64, left: Duration, e: &Entry) -> Ticket {
    if e.lease.is_zero() {
        Ticket::new(number, left)
    } else {
        Ticket::renewing(number, left, e.lease, e.liveness)
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

    /// lua/issue.lua, at once: also the conversation id as the store keeps
    /// it (the guard shares it instead of copying it) and the instant the
    /// issue was decided at.
    pub(crate) fn issue_now(
        &self,
        cid: &str,
        lifetime_ms: u64,
        liveness_ms: Option<u64>,
        now: Instant,
    ) -> Result<(Option<Issued>, Arc<str>)> {
        let lifetime = Duration::from_millis(lifetime_ms);
        let liveness = liveness_ms.map(Duration::from_millis);
        self.try_run_at(cid, now, |s, now| {
            s.issue(cid, lifetime, liveness, None, now)
        })
    }

    /// lua/release.lua, at once.
    pub(crate) fn release_now(&self, cid: &str, removal: Removal) -> Released {
        let Removal { ticket, mode, by } = removal;
        self.run(cid, |s, now| s.release(cid, ticket, mode, by, now))
    }

    /// Runs one transition and sends its notice while still holding the state
    /// lock, so waiters see notices in the order the transitions happened.
    fn run<T>(&self, cid: &str, step: impl FnOnce(&mut State, Instant) -> Step<T>) -> T {
        // Transitions never panic half-way through a change (they validate
        // first), so a poisoned lock still guards consistent state.
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let (reply, notice) = step(&mut state, self.now());
        if let Some(notice) = notice {
            self.shared.notifier.send(cid, notice);
        }
        reply
    }

    fn try_run<T>(
        &self,
        cid: &str,
        step: impl FnOnce(&mut State, Instant) -> Result<Step<T>>,
    ) -> Result<T> {
        self.try_run_at(cid, Instant::now(), step)
    }

    /// `try_run` with the caller's reading of the real clock (a manual clock
    /// still takes precedence).
    fn try_run_at<T>(
        &self,
        cid: &str,
        real_now: Instant,
        step: impl FnOnce(&mut State, Instant) -> Result<Step<T>>,
    ) -> Result<T> {
        let now = match &self.shared.manual_clock {
            Some(clock) => *clock.lock().unwrap_or_else(|p| p.into_inner()),
            None => real_now,
        };
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let (reply, notice) = step(&mut state, now)?;
        if let Some(notice) = notice {
            self.shared.notifier.send(cid, notice);
        }
        Ok(reply)
    }
}

impl Backend for MemoryBackend {
    async fn issue(&self, cid: &str, args: IssueArgs<'_>) -> Result<Option<Issued>> {
        let lifetime = Duration::from_millis(args.lifetime_ms);
        let liveness = args.liveness_ms.map(Duration::from_millis);
        let request = args.request;
        self.try_run(cid, |s, now| s.issue(cid, lifetime, liveness, request, now))
            .map(|(issued, _)| issued)
    }

    async fn cancel(&self, cid: &str, request: &str, remember_ms: u64) -> Result<Option<u64>> {
        let remember = Duration::from_millis(remember_ms);
        Ok(self.run(cid, |s, now| s.cancel(cid, request, remember, now)))
    }

    async fn extend(&self, cid: &str, renewal: Renewal) -> Result<Option<Duration>> {
        let lease = Duration::from_millis(renewal.lease_ms);
        let (ticket, fence) = (renewal.ticket, renewal.fence);
        Ok(self.run(cid, |s, now| s.extend(cid, ticket, fence, lease, now)))
    }

    async fn poll(&self, cid: &str, ticket: TicketRef) -> Result<Polled> {
        Ok(self.run(cid, |s, now| s.poll(cid, ticket, now)))
    }

    async fn release(&self, cid: &str, removal: Removal) -> Result<Released> {
        Ok(self.release_now(cid, removal))
    }

    async fn read(&self, cid: &str, limit: Option<u64>) -> Result<Option<Record>> {
        Ok(self.run(cid, |s, now| silent(s.read(cid, limit, now))))
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

    async fn inspect(&self, cid: &str, limit: Option<u64>) -> Result<Inspection> {
        Ok(self.run(cid, |s, now| silent(s.inspect(cid, limit, now))))
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

    fn any(number: u64) -> TicketRef {
        TicketRef {
            number,
            epoch: None,
        }
    }

    #[test]
    fn keys_vanish_a_margin_after_their_latest_expiry() {
        let mut s = State::default();
        let t0 = Instant::now();
        s.issue("c", Duration::from_millis(100), None, None, t0)
            .unwrap();
        s.release("c", any(0), ReleaseMode::Finish, Remover::Owner, at(t0, 10));
        assert!(s.read("c", None, at(t0, 1100)).is_some());
        assert!(s.read("c", None, at(t0, 1101)).is_none());
        // Its slot goes at the next sweep, as Redis's background expiry would.
        for i in 0..SWEEP_EVERY {
            s.read(&format!("other-{i}"), None, at(t0, 1101));
        }
        assert!(s.keys.is_empty(), "{} slots left", s.keys.len());
    }

    #[test]
    fn an_expired_head_is_dropped_and_its_successor_announced() {
        let mut s = State::default();
        let t0 = Instant::now();
        let ((first, _), _) = s
            .issue("c", Duration::from_millis(10), None, None, t0)
            .unwrap();
        let first = first.unwrap();
        let ((second, _), _) = s
            .issue("c", Duration::from_millis(1000), None, None, t0)
            .unwrap();
        assert_eq!(second.unwrap().now_serving, first.ticket);
        let poll = TicketRef {
            number: 1,
            epoch: Some(first.epoch),
        };
        let (polled, notice) = s.poll("c", poll, at(t0, 11));
        assert!(matches!(polled, Polled::Served { .. }), "{polled:?}");
        // The poller learns from its reply; nobody else needs telling.
        assert_eq!(notice, None);
        let (_, notice) = s
            .issue("c", Duration::from_millis(1000), None, None, at(t0, 12))
            .unwrap();
        assert_eq!(notice, None);
    }

    #[test]
    fn a_cancel_before_its_issue_makes_the_issue_take_nothing() {
        let mut s = State::default();
        let t0 = Instant::now();
        let (found, _) = s.cancel("c", "r1", Duration::from_secs(10), t0);
        assert_eq!(found, None);
        let ((issued, _), _) = s
            .issue("c", Duration::from_secs(1), None, Some("r1"), at(t0, 1))
            .unwrap();
        assert_eq!(issued, None);
        assert!(s.read("c", None, at(t0, 2)).is_none());
        // And after its issue: the ticket is given back.
        s.issue("c", Duration::from_secs(1), None, Some("r2"), at(t0, 3))
            .unwrap();
        let (found, _) = s.cancel("c", "r2", Duration::from_secs(10), at(t0, 4));
        assert_eq!(found, Some(0));
        assert!(s.read("c", None, at(t0, 5)).is_none());
    }
}
