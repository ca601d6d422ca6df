//! The backend contract: one method per Lua script, same names, same replies.
//!
//! `memory` implements it with a synchronous state machine, `redis` by running
//! the scripts in `lua/`. The conformance suite in `tests/` runs every case
//! against both and is what proves the two agree.

use std::future::Future;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::error::LockError;
use crate::inspect::Inspection;
use crate::notify::Notice;
use crate::ticket::{Ticket, TicketLock};

pub(crate) mod classify;
pub(crate) mod connect;
pub(crate) mod connection;
pub(crate) mod faulty;
pub(crate) mod memory;
pub(crate) mod redis;
pub(crate) mod sentinel;

/// How long every key outlives the latest ticket expiry (`MARGIN_MS` in lua/common.lua).
pub(crate) const KEY_TTL_MARGIN: Duration = Duration::from_millis(1000);

/// The highest ticket number ever issued or saved (`MAX_TICKET` in
/// lua/common.lua): Lua's numbers are doubles, exact up to 2^53.
pub(crate) const MAX_TICKET: u64 = (1 << 53) - 1;

/// A ticket as the acquire loop knows it: its number and the record it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TicketRef {
    pub(crate) number: u64,
    /// `None` addresses the number in whatever record exists (Rasa's API).
    pub(crate) epoch: Option<u64>,
}

/// Reply of `issue` (lua/issue.lua), when the issue ran (it does not when
/// `cancel` came first for its request id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Issued {
    pub(crate) ticket: u64,
    pub(crate) epoch: u64,
    pub(crate) now_serving: u64,
    /// Until the served ticket expires; when the new ticket is served, its lease.
    pub(crate) head_remaining: Option<Duration>,
    /// The fencing token, when the new ticket is served at once.
    pub(crate) fence: Option<u64>,
}

/// Reply of `poll` (lua/poll.lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Polled {
    Served {
        fence: u64,
        /// Until the lease ends, by the store's clock when it answered.
        remaining: Duration,
    },
    Waiting {
        /// An upper bound: numbers from the served ticket up to ours.
        ahead: u64,
        head_remaining: Option<Duration>,
        own_remaining: Duration,
    },
    Gone,
}

/// Reply of `release` (lua/release.lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Released {
    pub(crate) removed: bool,
    pub(crate) now_serving: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReleaseMode {
    Finish,
    Cleanup,
}

impl ReleaseMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReleaseMode::Finish => "finish",
            ReleaseMode::Cleanup => "cleanup",
        }
    }
}

/// Who removes a ticket: its owner (nobody needs telling it left), or
/// someone else (its waiter or holder is told at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remover {
    Owner,
    Admin,
}

/// What an issue asks for (lua/issue.lua's ARGV).
#[derive(Debug, Clone, Copy)]
pub(crate) struct IssueArgs<'a> {
    pub(crate) lifetime_ms: u64,
    /// `Some` for a renewing ticket (what `lock` takes), `None` for a fixed
    /// one (Rasa's `issue_ticket`); see lua/common.lua.
    pub(crate) liveness_ms: Option<u64>,
    /// The id `cancel` can give the ticket back by.
    pub(crate) request: Option<&'a str>,
}

/// A holder renewing its lease (lua/extend.lua's ARGV): the grant is named
/// by its ticket and fencing token, so only the holder can renew it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Renewal {
    pub(crate) ticket: u64,
    pub(crate) fence: u64,
    pub(crate) lease_ms: u64,
}

/// A ticket leaving (lua/release.lua's ARGV).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Removal {
    pub(crate) ticket: TicketRef,
    pub(crate) mode: ReleaseMode,
    pub(crate) by: Remover,
}

impl Removal {
    /// The owner giving its ticket back, served or not.
    pub(crate) fn by_owner(ticket: TicketRef) -> Removal {
        Removal {
            ticket,
            mode: ReleaseMode::Cleanup,
            by: Remover::Owner,
        }
    }
}

/// Reply of `read` (lua/read.lua).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) next: u64,
    pub(crate) epoch: u64,
    /// Live tickets; when no ticket was asked for, only whether there is one (0 or 1).
    pub(crate) live: u64,
    pub(crate) tickets: Vec<Ticket>,
}

/// Reply of `update` (lua/update.lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Updated {
    pub(crate) pruned: u64,
    pub(crate) now_serving: Option<u64>,
}

/// What a backend can fail with, before the store adds the conversation.
/// Backend-neutral: each backend classifies its own errors into it (the
/// Redis backend in [`classify`]), so the store knows no dependency's errors.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The store itself failed: connection, timeout, server error.
    Store {
        /// Whether repeating the call may succeed.
        retryable: bool,
        /// The call may have run although no answer came back (a timeout, a
        /// connection lost after sending).
        unknown_outcome: bool,
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A key of the conversation holds a foreign type or value.
    Foreign(String),
    /// The store refused the call's arguments for this conversation (a
    /// script's `ERR ticketlock:` reply, or its in-memory twin): nothing changed.
    Refused(String),
    /// A script reply did not have the documented shape.
    Reply(String),
    /// A fault injected by the test-only faulty backend.
    Injected(faulty::Op),
}

impl Fault {
    /// True when the call may have run in the store although no answer came
    /// (a timeout, a connection lost after sending): its effect is unknown.
    pub(crate) fn may_have_run(&self) -> bool {
        match self {
            Fault::Store {
                unknown_outcome, ..
            } => *unknown_outcome,
            Fault::Injected(_) => true,
            Fault::Foreign(_) | Fault::Refused(_) | Fault::Reply(_) => false,
        }
    }

    /// The public error, naming the conversation the call was about.
    pub(crate) fn into_error(self, conversation_id: Option<&str>) -> LockError {
        let conversation_id = conversation_id.map(str::to_owned);
        match self {
            Fault::Foreign(detail) => LockError::Corrupted {
                conversation_id: conversation_id.unwrap_or_default(),
                detail,
            },
            Fault::Refused(reason) => LockError::InvalidInput {
                what: "request",
                reason,
            },
            Fault::Reply(detail) => LockError::Backend {
                conversation_id,
                retryable: false,
                source: detail.into(),
            },
            Fault::Injected(op) => LockError::Backend {
                conversation_id,
                retryable: true,
                source: format!("injected fault at {op:?}").into(),
            },
            Fault::Store {
                retryable, source, ..
            } => LockError::Backend {
                conversation_id,
                retryable,
                source,
            },
        }
    }
}

/// Listening for a conversation's wake-ups; stops listening on drop.
pub(crate) struct Subscription {
    pub(crate) notices: broadcast::Receiver<Notice>,
    pub(crate) on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(on_drop) = self.on_drop.take() {
            on_drop();
        }
    }
}

pub(crate) type Result<T> = std::result::Result<T, Fault>;

/// One method per script; each returns that script's decoded reply.
pub(crate) trait Backend: Send + Sync {
    /// `None` when a `cancel` for the issue's request came first: nothing was
    /// issued.
    fn issue(
        &self,
        cid: &str,
        args: IssueArgs<'_>,
    ) -> impl Future<Output = Result<Option<Issued>>> + Send;
    /// Gives back the ticket the issue carrying `request` took, or makes sure
    /// it takes none; the number given back, if the issue had run.
    fn cancel(
        &self,
        cid: &str,
        request: &str,
        remember_ms: u64,
    ) -> impl Future<Output = Result<Option<u64>>> + Send;
    /// Renews the served ticket's lease; `None` when the lease was lost.
    fn extend(
        &self,
        cid: &str,
        renewal: Renewal,
    ) -> impl Future<Output = Result<Option<Duration>>> + Send;
    fn poll(&self, cid: &str, ticket: TicketRef) -> impl Future<Output = Result<Polled>> + Send;
    fn release(&self, cid: &str, removal: Removal)
        -> impl Future<Output = Result<Released>> + Send;
    /// `limit`: how many tickets to list from the head, `None` for all.
    fn read(
        &self,
        cid: &str,
        limit: Option<u64>,
    ) -> impl Future<Output = Result<Option<Record>>> + Send;
    fn save(&self, lock: &TicketLock) -> impl Future<Output = Result<Option<u64>>> + Send;
    fn delete(&self, cid: &str) -> impl Future<Output = Result<bool>> + Send;
    fn update(&self, cid: &str) -> impl Future<Output = Result<Updated>> + Send;
    /// `limit`: how many tickets to list, `None` for all.
    fn inspect(
        &self,
        cid: &str,
        limit: Option<u64>,
    ) -> impl Future<Output = Result<Inspection>> + Send;
    /// Starts listening for `cid`'s wake-ups; when this returns, no notice sent
    /// afterwards can be missed (short of a lost connection).
    fn subscribe(&self, cid: &str) -> impl Future<Output = Result<Subscription>> + Send;
}

/// The runtime choice between backends: one handle, one `match` per method.
#[derive(Debug, Clone)]
pub(crate) enum AnyBackend {
    Memory(memory::MemoryBackend),
    Redis(redis::RedisBackend),
    FaultyMemory(faulty::FaultyBackend<memory::MemoryBackend>),
    FaultyRedis(faulty::FaultyBackend<redis::RedisBackend>),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            AnyBackend::Memory($b) => $call.await,
            AnyBackend::Redis($b) => $call.await,
            AnyBackend::FaultyMemory($b) => $call.await,
            AnyBackend::FaultyRedis($b) => $call.await,
        }
    };
}

impl AnyBackend {
    /// True when every call completes without yielding (the in-memory
    /// store): such a call cannot be cancelled half-way, so it needs no task
    /// of its own.
    pub(crate) fn answers_at_once(&self) -> bool {
        matches!(self, AnyBackend::Memory(_))
    }

    /// How long a call may take before it fails (Redis's socket timeout).
    pub(crate) fn call_timeout(&self) -> Option<Duration> {
        match self {
            AnyBackend::Redis(b) => Some(b.socket_timeout),
            AnyBackend::FaultyRedis(b) => Some(b.inner().socket_timeout),
            AnyBackend::Memory(_) | AnyBackend::FaultyMemory(_) => None,
        }
    }
}

impl Backend for AnyBackend {
    async fn issue(&self, cid: &str, args: IssueArgs<'_>) -> Result<Option<Issued>> {
        dispatch!(self, b => b.issue(cid, args))
    }
    async fn cancel(&self, cid: &str, request: &str, remember_ms: u64) -> Result<Option<u64>> {
        dispatch!(self, b => b.cancel(cid, request, remember_ms))
    }
    async fn extend(&self, cid: &str, renewal: Renewal) -> Result<Option<Duration>> {
        dispatch!(self, b => b.extend(cid, renewal))
    }
    async fn poll(&self, cid: &str, ticket: TicketRef) -> Result<Polled> {
        dispatch!(self, b => b.poll(cid, ticket))
    }
    async fn release(&self, cid: &str, removal: Removal) -> Result<Released> {
        dispatch!(self, b => b.release(cid, removal))
    }
    async fn read(&self, cid: &str, limit: Option<u64>) -> Result<Option<Record>> {
        dispatch!(self, b => b.read(cid, limit))
    }
    async fn save(&self, lock: &TicketLock) -> Result<Option<u64>> {
        dispatch!(self, b => b.save(lock))
    }
    async fn delete(&self, cid: &str) -> Result<bool> {
        dispatch!(self, b => b.delete(cid))
    }
    async fn update(&self, cid: &str) -> Result<Updated> {
        dispatch!(self, b => b.update(cid))
    }
    async fn inspect(&self, cid: &str, limit: Option<u64>) -> Result<Inspection> {
        dispatch!(self, b => b.inspect(cid, limit))
    }
    async fn subscribe(&self, cid: &str) -> Result<Subscription> {
        dispatch!(self, b => b.subscribe(cid))
    }
}
