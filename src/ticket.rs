//! Snapshots of a conversation's queue: [`Ticket`] and [`TicketLock`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One place in a conversation's queue.
///
/// A ticket is *fixed* (Rasa's: it expires its lifetime after being issued,
/// waiting included; what [`LockStore::issue_ticket`](crate::LockStore::issue_ticket)
/// takes) or *renewing* (what [`LockStore::lock`](crate::LockStore::lock)
/// takes: it waits as long as its waiter checks in, and once granted holds
/// the lock for its lease). A snapshot keeps each ticket's kind and terms, so
/// saving it back with [`LockStore::save_lock`](crate::LockStore::save_lock)
/// changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    number: u64,
    #[serde(rename = "expires_in_ms", with = "millis")]
    expires_in: Duration,
    #[serde(
        rename = "lease_ms",
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_millis"
    )]
    lease: Option<Duration>,
    #[serde(
        rename = "dead_waiter_timeout_ms",
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_millis"
    )]
    dead_waiter_timeout: Option<Duration>,
}

impl Ticket {
    /// A fixed ticket with `number` that expires `expires_in` from when it is saved.
    pub fn new(number: u64, expires_in: Duration) -> Self {
        Ticket {
            number,
            expires_in,
            lease: None,
            dead_waiter_timeout: None,
        }
    }

    /// A renewing ticket: it expires `expires_in` from when it is saved unless
    /// its waiter checks in (each check-in gives it `dead_waiter_timeout`
    /// more), and once granted it holds the lock for `lease` from the grant.
    pub fn renewing(
        number: u64,
        expires_in: Duration,
        lease: Duration,
        dead_waiter_timeout: Duration,
    ) -> Self {
        Ticket {
            number,
            expires_in,
            lease: Some(lease),
            dead_waiter_timeout: Some(dead_waiter_timeout),
        }
    }

    /// The ticket's number; numbers of one conversation only go up.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Lifetime left when the snapshot was taken.
    pub fn expires_in(&self) -> Duration {
        self.expires_in
    }

    /// The lease a renewing ticket holds the lock for once granted; `None`
    /// for a fixed ticket.
    pub fn lease(&self) -> Option<Duration> {
        self.lease
    }

    /// How long a renewing ticket survives without its waiter checking in;
    /// `None` for a fixed ticket.
    pub fn dead_waiter_timeout(&self) -> Option<Duration> {
        self.dead_waiter_timeout
    }

    /// True for a renewing ticket (taken by `lock`), false for a fixed one.
    pub fn is_renewing(&self) -> bool {
        self.lease.is_some()
    }
}

/// A snapshot of one conversation's ticket queue, in serving order, with
/// expired tickets left out. Mirrors Rasa's `TicketLock`.
///
/// A snapshot does not change when the store does: read a new one with
/// [`LockStore::get_lock`](crate::LockStore::get_lock), write one back with
/// [`LockStore::save_lock`](crate::LockStore::save_lock).
///
/// ```
/// use std::time::Duration;
/// use ticketlock::LockStore;
///
/// let mut lock = LockStore::create_lock("conv-1");
/// let first = lock.issue_ticket(Duration::from_secs(60));
/// let second = lock.issue_ticket(Duration::from_secs(60));
/// assert_eq!((first, second), (0, 1));
/// assert_eq!(lock.now_serving(), Some(0));
/// assert!(!lock.is_locked(0) && lock.is_locked(1));
/// lock.remove_ticket_for(0);
/// assert_eq!(lock.now_serving(), Some(1));
/// assert_eq!(lock.last_issued(), Some(1));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketLock {
    conversation_id: String,
    tickets: Vec<Ticket>,
    next_number: u64,
}

impl TicketLock {
    pub(crate) fn from_parts(
        conversation_id: String,
        tickets: Vec<Ticket>,
        next_number: u64,
    ) -> Self {
        TicketLock {
            conversation_id,
            tickets,
            next_number,
        }
    }

    /// An empty queue for `conversation_id`; numbering starts at 0.
    pub fn new(conversation_id: impl Into<String>) -> Self {
        Self::from_parts(conversation_id.into(), Vec::new(), 0)
    }

    /// The conversation this queue belongs to.
    pub fn conversation_id(&self) -> &str {
        &self.conversation_id
    }

    /// Live tickets in serving order.
    pub fn tickets(&self) -> &[Ticket] {
        &self.tickets
    }

    /// Number of the ticket being served (the head of the queue), if any.
    pub fn now_serving(&self) -> Option<u64> {
        self.tickets.first().map(Ticket::number)
    }

    /// Number of the last ticket issued, if any was. Unlike Rasa this counts
    /// tickets already finished or expired: numbers are never handed out twice.
    pub fn last_issued(&self) -> Option<u64> {
        self.next_number.checked_sub(1)
    }

    /// The number the next issued ticket will get.
    pub fn next_number(&self) -> u64 {
        self.next_number
    }

    /// Rasa's `is_locked`: true unless `ticket` is the one being served.
    pub fn is_locked(&self, ticket: u64) -> bool {
        self.now_serving() != Some(ticket)
    }

    /// True when the queue holds any live ticket (Rasa: `len(tickets) > 0`).
    pub fn is_someone_waiting(&self) -> bool {
        !self.tickets.is_empty()
    }

    /// Appends a ticket to this snapshot and returns its number; persist it
    /// with `save_lock`. Prefer [`LockStore::issue_ticket`](crate::LockStore::issue_ticket),
    /// which does this atomically in the store.
    pub fn issue_ticket(&mut self, lifetime: Duration) -> u64 {
        let number = self.next_number;
        self.next_number = self.next_number.saturating_add(1);
        self.tickets.push(Ticket::new(number, lifetime));
        number
    }

    /// Removes ticket `number` from this snapshot, if present.
    pub fn remove_ticket_for(&mut self, number: u64) {
        self.tickets.retain(|t| t.number != number);
    }
}

mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis().min(u64::MAX as u128) as u64)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_through_json() {
        let mut lock = TicketLock::new("c{1}");
        lock.issue_ticket(Duration::from_millis(1500));
        let json = serde_json::to_string(&lock).unwrap();
        assert_eq!(
            json,
            r#"{"conversation_id":"c{1}","tickets":[{"number":0,"expires_in_ms":1500}],"next_number":1}"#
        );
        assert_eq!(serde_json::from_str::<TicketLock>(&json).unwrap(), lock);
    }

    #[test]
    fn renewing_tickets_keep_their_terms_through_json() {
        let mut lock = TicketLock::new("c");
        lock.issue_ticket(Duration::from_millis(10));
        let mut tickets = lock.tickets().to_vec();
        tickets.push(Ticket::renewing(
            1,
            Duration::from_millis(20),
            Duration::from_secs(60),
            Duration::from_secs(5),
        ));
        let lock = TicketLock::from_parts("c".into(), tickets, 2);
        let json = serde_json::to_string(&lock).unwrap();
        assert!(
            json.contains(r#""lease_ms":60000,"dead_waiter_timeout_ms":5000"#),
            "{json}"
        );
        let back: TicketLock = serde_json::from_str(&json).unwrap();
        assert_eq!(back, lock);
        assert!(back.tickets()[1].is_renewing() && !back.tickets()[0].is_renewing());
    }

    #[test]
    fn an_empty_lock_serves_nobody() {
        let lock = TicketLock::new("c");
        assert_eq!(lock.now_serving(), None);
        assert_eq!(lock.last_issued(), None);
        assert!(lock.is_locked(0));
        assert!(!lock.is_someone_waiting());
    }
}
