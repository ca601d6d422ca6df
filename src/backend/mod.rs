//! The backend contract: one method per Lua script, same names, same replies.
//!
//! `memory` implements it with a synchronous state machine, `redis` by running
//! the scripts in `lua/`. The conformance suite in `tests/` runs every case
//! against both and is what proves the two agree.

use std::future::Future;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::notify::Notice;
use crate::ticket::{Ticket, TicketLock};

pub(crate) mod connection;
pub(crate) mod faulty;
pub(crate) mod memory;
pub(crate) mod redis;

/// How long every key outlives the latest ticket expiry (`MARGIN_MS` in lua/common.lua).
pub(crate) const KEY_TTL_MARGIN: Duration = Duration::from_millis(1000);

/// A ticket as the acquire loop knows it: its number and the record it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TicketRef {
    pub(crate) number: u64,
    /// `None` addresses the number in whatever record exists (Rasa's API).
    pub(crate) epoch: Option<u64>,
}

/// Reply of `issue` (lua/issue.lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Issued {
    pub(crate) ticket: u64,
    pub(crate) epoch: u64,
    pub(crate) now_serving: u64,
    pub(crate) head_remaining: Option<Duration>,
    /// The fencing token, when the new ticket is served at once.
    pub(crate) fence: Option<u64>,
}

/// Reply of `poll` (lua/poll.lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Polled {
    Served {
        fence: u64,
    },
    Waiting {
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

/// Reply of `read` (lua/read.lua).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) next: u64,
    pub(crate) epoch: u64,
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
#[derive(Debug)]
pub(crate) enum Fault {
    Redis(::redis::RedisError),
    /// A key of the conversation holds a foreign type or value.
    Foreign(String),
    /// A script reply did not have the documented shape.
    Reply(String),
    /// A fault injected by the test-only faulty backend.
    Injected(faulty::Op),
}

impl From<::redis::RedisError> for Fault {
    fn from(e: ::redis::RedisError) -> Self {
        if e.code() == Some("WRONGTYPE") {
            return Fault::Foreign(
                e.detail()
                    .unwrap_or("a key holds the wrong type")
                    .to_owned(),
            );
        }
        Fault::Redis(e)
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
    /// `liveness_ms`: `Some` for a renewing ticket (what `lock` takes), `None`
    /// for a fixed one (Rasa's `issue_ticket`); see lua/common.lua.
    fn issue(
        &self,
        cid: &str,
        lifetime_ms: u64,
        liveness_ms: Option<u64>,
    ) -> impl Future<Output = Result<Issued>> + Send;
    /// Renews the served ticket's lease; `None` when the lease was lost.
    fn extend(
        &self,
        cid: &str,
        ticket: u64,
        fence: u64,
        lease_ms: u64,
    ) -> impl Future<Output = Result<Option<Duration>>> + Send;
    fn poll(&self, cid: &str, ticket: TicketRef) -> impl Future<Output = Result<Polled>> + Send;
    fn release(
        &self,
        cid: &str,
        ticket: TicketRef,
        mode: ReleaseMode,
    ) -> impl Future<Output = Result<Released>> + Send;
    /// `limit`: how many tickets to list from the head, `None` for all.
    fn read(
        &self,
        cid: &str,
        limit: Option<u64>,
    ) -> impl Future<Output = Result<Option<Record>>> + Send;
    fn save(&self, lock: &TicketLock) -> impl Future<Output = Result<Option<u64>>> + Send;
    fn delete(&self, cid: &str) -> impl Future<Output = Result<bool>> + Send;
    fn update(&self, cid: &str) -> impl Future<Output = Result<Updated>> + Send;
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

impl Backend for AnyBackend {
    async fn issue(&self, cid: &str, lifetime_ms: u64, liveness_ms: Option<u64>) -> Result<Issued> {
        dispatch!(self, b => b.issue(cid, lifetime_ms, liveness_ms))
    }
    async fn extend(
        &self,
        cid: &str,
        ticket: u64,
        fence: u64,
        lease_ms: u64,
    ) -> Result<Option<Duration>> {
        dispatch!(self, b => b.extend(cid, ticket, fence, lease_ms))
    }
    async fn poll(&self, cid: &str, ticket: TicketRef) -> Result<Polled> {
        dispatch!(self, b => b.poll(cid, ticket))
    }
    async fn release(&self, cid: &str, ticket: TicketRef, mode: ReleaseMode) -> Result<Released> {
        dispatch!(self, b => b.release(cid, ticket, mode))
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
    async fn subscribe(&self, cid: &str) -> Result<Subscription> {
        dispatch!(self, b => b.subscribe(cid))
    }
}
