//! What [`LockStore::inspect`](crate::LockStore::inspect) reports: one
//! conversation as lua/inspect.lua (or its in-memory twin) sees it. The
//! rules that decide liveness and grants live in the scripts; this is only
//! their answer, decoded once.

use std::time::Duration;

use serde::Serialize;

/// Everything the store knows about one conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Inspection {
    /// The conversation's record; `None` when it has none.
    pub record: Option<InspectedRecord>,
    /// Until the conversation's key expires (Redis: its `PTTL`); `None`
    /// when there is no key.
    #[serde(rename = "ttl_ms", with = "opt_millis")]
    pub ttl: Option<Duration>,
    /// Request ids cancelled before their issue ran, still remembered so a
    /// late issue takes no ticket (lua/cancel.lua).
    pub cancelled_requests: u64,
}

/// A conversation's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InspectedRecord {
    /// The number the next ticket will get.
    pub next: u64,
    /// The record's epoch: tickets of an older record are never served.
    pub epoch: u64,
    /// The lowest live ticket: the one served, or about to be at the next write.
    pub head: Option<u64>,
    /// The ticket granted last (it may have left since).
    pub served: Option<u64>,
    /// That grant's fencing token.
    pub fence: Option<u64>,
    /// How long ago that grant was made, while its owner has not picked it
    /// up yet; `None` once it has.
    #[serde(rename = "granted_ms_ago", with = "opt_millis")]
    pub granted_ago: Option<Duration>,
    /// Live tickets.
    pub live: u64,
    /// Tickets past their expiry that no write has dropped yet.
    pub expired: u64,
    /// Every ticket, live or expired, lowest number first.
    pub tickets: Vec<InspectedTicket>,
}

/// One ticket of an [`InspectedRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InspectedTicket {
    /// The ticket's number.
    pub number: u64,
    /// Milliseconds until it expires; negative: it expired that long ago.
    pub remaining_ms: i64,
    /// A renewing ticket's lease once granted; `None` for a fixed ticket.
    #[serde(rename = "lease_ms", with = "opt_millis")]
    pub lease: Option<Duration>,
    /// A renewing ticket's dead-waiter timeout; `None` for a fixed ticket.
    #[serde(rename = "dead_waiter_timeout_ms", with = "opt_millis")]
    pub dead_waiter_timeout: Option<Duration>,
    /// The request id its issue carried, if any.
    pub request: Option<String>,
}

mod opt_millis {
    use std::time::Duration;

    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis().min(u64::MAX as u128) as u64)),
            None => s.serialize_none(),
        }
    }
}
