//! A backend that wraps another and injects faults at each operation:
//! errors before or after the operation ran, delays, and hangs. It exists
//! for the fault tests (`tests/faults_injected.rs`) and is reachable only
//! through the hidden `ticketlock::__testing` module.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{
    Backend, Fault, IssueArgs, Issued, Polled, Record, Released, Removal, Renewal, Result,
    Subscription, TicketRef, Updated,
};
use crate::inspect::Inspection;
use crate::ticket::TicketLock;

/// The operation a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// lua/issue.lua
    Issue,
    /// lua/poll.lua
    Poll,
    /// lua/release.lua
    Release,
    /// lua/extend.lua
    Extend,
    /// lua/read.lua
    Read,
    /// lua/save.lua
    Save,
    /// lua/delete.lua
    Delete,
    /// lua/update.lua
    Update,
    /// lua/cancel.lua
    Cancel,
    /// lua/inspect.lua
    Inspect,
    /// Listening for wake-ups.
    Subscribe,
}

/// What happens to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Injected {
    /// The call goes through untouched.
    Pass,
    /// The call fails without reaching the store.
    FailBefore,
    /// The call reaches the store and changes it, but its reply is lost.
    FailAfter,
    /// The call waits this long, then goes through.
    Delay(Duration),
    /// The call never completes.
    Hang,
}

pub(crate) type Plan = Arc<dyn Fn(Op) -> Injected + Send + Sync>;

/// Wraps a plain backend (in memory or Redis); wrapping a faulty one again
/// is not needed by any test, and would make the future types recursive.
#[derive(Clone)]
pub(crate) struct FaultyBackend<B> {
    inner: B,
    plan: Plan,
}

impl<B: std::fmt::Debug> std::fmt::Debug for FaultyBackend<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyBackend")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> FaultyBackend<B> {
    pub(crate) fn new(inner: B, plan: Plan) -> Self {
        FaultyBackend { inner, plan }
    }

    pub(crate) fn inner(&self) -> &B {
        &self.inner
    }

    pub(crate) fn with_plan(&self, plan: Plan) -> Self
    where
        B: Clone,
    {
        FaultyBackend::new(self.inner.clone(), plan)
    }

    async fn around<T>(&self, op: Op, call: impl Future<Output = Result<T>>) -> Result<T> {
        match (self.plan)(op) {
            Injected::Pass => call.await,
            Injected::FailBefore => Err(Fault::Injected(op)),
            Injected::FailAfter => {
                let _ = call.await;
                Err(Fault::Injected(op))
            }
            Injected::Delay(d) => {
                tokio::time::sleep(d).await;
                call.await
            }
            Injected::Hang => std::future::pending().await,
        }
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    async fn issue(&self, cid: &str, args: IssueArgs<'_>) -> Result<Option<Issued>> {
        self.around(Op::Issue, self.inner.issue(cid, args)).await
    }
    async fn cancel(&self, cid: &str, request: &str, remember_ms: u64) -> Result<Option<u64>> {
        self.around(Op::Cancel, self.inner.cancel(cid, request, remember_ms))
            .await
    }
    async fn extend(&self, cid: &str, renewal: Renewal) -> Result<Option<Duration>> {
        self.around(Op::Extend, self.inner.extend(cid, renewal))
            .await
    }
    async fn poll(&self, cid: &str, ticket: TicketRef) -> Result<Polled> {
        self.around(Op::Poll, self.inner.poll(cid, ticket)).await
    }
    async fn release(&self, cid: &str, removal: Removal) -> Result<Released> {
        self.around(Op::Release, self.inner.release(cid, removal))
            .await
    }
    async fn read(&self, cid: &str, limit: Option<u64>) -> Result<Option<Record>> {
        self.around(Op::Read, self.inner.read(cid, limit)).await
    }
    async fn save(&self, lock: &TicketLock) -> Result<Option<u64>> {
        self.around(Op::Save, self.inner.save(lock)).await
    }
    async fn delete(&self, cid: &str) -> Result<bool> {
        self.around(Op::Delete, self.inner.delete(cid)).await
    }
    async fn update(&self, cid: &str) -> Result<Updated> {
        self.around(Op::Update, self.inner.update(cid)).await
    }
    async fn inspect(&self, cid: &str, limit: Option<u64>) -> Result<Inspection> {
        self.around(Op::Inspect, self.inner.inspect(cid, limit))
            .await
    }
    async fn subscribe(&self, cid: &str) -> Result<Subscription> {
        self.around(Op::Subscribe, self.inner.subscribe(cid)).await
    }
}
