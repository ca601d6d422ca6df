//! [`LockStore`]: the public handle, Rasa's method names, and the acquire loop.
//!
//! Over 700 lines on purpose: it is the whole public surface of the store
//! (each method short, documented with its Rasa name) plus the one acquire
//! loop they share; guards, options, config and backends live elsewhere.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::backend::memory::MemoryBackend;
use crate::backend::{
    AnyBackend, Backend, IssueArgs, Polled, ReleaseMode, Removal, Remover, TicketRef, MAX_TICKET,
};
use crate::config::{self, ScriptMode, StoreConfig, StoreType, DEFAULT_SOCKET_TIMEOUT};
use crate::error::LockError;
use crate::guard::{grant_in, removes, Grant, LockGuard, OwnedTicket};
use crate::inspect::Inspection;
use crate::notify::Notice;
use crate::options::{self, LockOptions, Resolved, DEFAULT_LIFETIME};
use crate::ticket::TicketLock;
use crate::validate;

/// How long a cancelled request id is remembered by the store, in socket
/// timeouts: its issue can only still be on its way (in a buffer of a server
/// that stalled, in a network that is slower than the socket timeout) for
/// about that long after the cancel itself ran.
const REMEMBER_CANCELLED: u32 = 3;
/// How long the give-back after a timeout may delay the `Timeout` error: the
/// deadline has passed already, and the give-back finishes in the background.
const GIVE_BACK_GRACE: Duration = Duration::from_millis(100);
/// A tiny slack past the head's expiry, so the check after it sees it expired.
const PAST: Duration = Duration::from_millis(2);

/// A handle on a ticket lock store; cheap to clone, `Send + Sync`.
///
/// Every conversation has its own strictly first-in-first-out queue of
/// tickets. [`lock`](Self::lock) takes a ticket and waits until it is served;
/// the returned [`LockGuard`] gives the lock to the next ticket when released.
///
/// ## Behavior
/// - **In memory** ([`in_memory`](Self::in_memory), `memory://`, no config):
///   one process, no server, the same rules.
/// - **Redis** (`redis://`, `rediss://`, `type: redis`): every state change is
///   one atomic Lua script; any number of processes sharing the server and the
///   key prefix share the queues. The connection reconnects by itself; a call
///   during an outage fails with a retryable [`LockError::Backend`] after at
///   most the socket timeout.
/// - Hand-over is pushed (pub/sub in Redis), so the next waiter does not
///   wait for a poll; polling every `wait_time` is only a safety net.
#[derive(Debug, Clone)]
pub struct LockStore {
    inner: Arc<Inner>,
}

type Reconnect = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<LockStore, LockError>> + Send>> + Send + Sync,
>;

struct Inner {
    backend: AnyBackend,
    default_lifetime: Duration,
    /// `LockOptions::default()` resolved once: the common case needs no
    /// checks or conversions per call.
    default_options: Resolved,
    /// Makes the request ids issues carry: unique within this process, and
    /// across processes but for a 2^-64 chance.
    requests: RequestIds,
    /// How to reach the same Redis afresh, for a release that finds no
    /// runtime to run in (see `LockGuard`'s `## Behavior`).
    reconnect: Option<Reconnect>,
    /// Releases and cancellations running in the background ([`LockStore::flush`]).
    background: Arc<Background>,
    /// When a blocking release (no runtime left) last found the store
    /// unreachable: the next ones within a short while do not try again, so
    /// a process exiting while Redis is down does not wait once per guard.
    unreachable_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Counts the store's background work, so [`LockStore::flush`] can wait for it.
#[derive(Debug, Default)]
struct Background {
    running: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

/// A ticket owned, an issue in flight, or a release running in the
/// background; counted until dropped (done, or cut short by a runtime
/// shutting down).
pub(crate) struct Running(Arc<Background>);

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Running")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.done.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("backend", &self.backend)
            .field("default_lifetime", &self.default_lifetime)
            .finish_non_exhaustive()
    }
}

/// Request ids: a per-store random key mixed with a counter (splitmix64, a
/// bijection, so one store never repeats an id), in base 36.
struct RequestIds {
    key: u64,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let key = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        RequestIds {
            key,
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let mut z = self
            .next
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(self.key)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let mut digits = Vec::with_capacity(13);
        loop {
            digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(z % 36) as usize]);
            z /= 36;
            if z == 0 {
                break;
            }
        }
        digits.reverse();
        String::from_utf8(digits).expect("ascii")
    }
}

impl LockStore {
    pub(crate) fn with_backend(backend: AnyBackend, default_lifetime: Duration) -> Self {
        LockStore {
            inner: Arc::new(Inner {
                backend,
                default_lifetime,
                default_options: LockOptions::default()
                    .resolve(default_lifetime)
                    .expect("the default lifetime is valid"),
                requests: RequestIds::new(),
                reconnect: None,
                background: Arc::default(),
                unreachable_at: std::sync::Mutex::new(None),
            }),
        }
    }

    fn memory(lifetime: Duration) -> Self {
        Self::with_backend(AnyBackend::Memory(MemoryBackend::default()), lifetime)
    }

    /// A store in this process's memory, with the default lifetime of 60 s
    /// (`TICKET_LOCK_LIFETIME` is read by [`create`](Self::create) and
    /// [`from_url`](Self::from_url), which can report a bad value).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), ticketlock::LockError> {
    /// let store = ticketlock::LockStore::in_memory();
    /// let guard = store.lock("conv-1").await?;
    /// assert_eq!(guard.ticket(), 0);
    /// guard.release().await?;
    /// assert!(store.get_lock("conv-1").await?.is_none());
    /// # Ok(()) }
    /// ```
    pub fn in_memory() -> Self {
        Self::memory(DEFAULT_LIFETIME)
    }

    /// A store from a URL: `memory://`, `redis://[user:password@]host[:port][/db]`,
    /// `rediss://...` (TLS), `redis+cluster://h1:p1,h2:p2` (Redis Cluster) or
    /// `redis+sentinel://s1:p1,s2:p2/<service>` (Sentinel; `rediss+...` for
    /// TLS to the data nodes). Redis connects before this returns.
    pub async fn from_url(url: &str) -> Result<Self, LockError> {
        let lifetime = options::lifetime_from_env()?;
        if config::is_memory_url(url) {
            return Ok(Self::memory(lifetime));
        }
        Self::connect(config::resolve(&StoreConfig::from_url(url)?)?, lifetime).await
    }

    /// A store from Rasa-style configuration; `None` means in memory.
    pub async fn create(config: Option<&StoreConfig>) -> Result<Self, LockError> {
        let lifetime = options::lifetime_from_env()?;
        match config {
            Some(c) if c.store_type == StoreType::Redis => {
                Self::connect(config::resolve(c)?, lifetime).await
            }
            _ => Ok(Self::memory(lifetime)),
        }
    }

    async fn connect(target: config::Deployment, lifetime: Duration) -> Result<Self, LockError> {
        // The way back to the same Redis, for a release that finds no runtime
        // to run in: a fresh connection that needs no FUNCTION LOAD.
        let mut again = target.clone();
        again.script_mode = ScriptMode::Eval;
        let reconnect: Reconnect = Arc::new(move || {
            let target = again.clone();
            Box::pin(async move {
                let backend = crate::backend::connect::open(target).await?;
                Ok(Self::with_backend(
                    AnyBackend::Redis(backend),
                    DEFAULT_LIFETIME,
                ))
            })
        });
        // Boxed: connecting nests deep enough to overflow the compiler's
        // trait checks in callers' futures.
        let backend = Box::pin(crate::backend::connect::open(target)).await?;
        let mut store = Self::with_backend(AnyBackend::Redis(backend), lifetime);
        Arc::get_mut(&mut store.inner).expect("just made").reconnect = Some(reconnect);
        Ok(store)
    }

    /// Counts something that will give a ticket back (see [`flush`](Self::flush))
    /// until the token is dropped. The in-memory store gives tickets back at
    /// once and counts nothing.
    pub(crate) fn track(&self) -> Option<Running> {
        if self.backend().answers_at_once() {
            return None;
        }
        let background = self.inner.background.clone();
        background.running.fetch_add(1, Ordering::AcqRel);
        Some(Running(background))
    }

    /// Runs `work` in a task of the current runtime, counted for [`flush`](Self::flush);
    /// gives `work` back when no runtime accepts it.
    pub(crate) fn spawn_background<F>(&self, work: F) -> Result<(), F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(work);
        };
        let running = self.track();
        runtime.spawn(async move {
            let _running = running;
            work.await;
        });
        Ok(())
    }

    /// Waits until every ticket this store (and its clones) took has been
    /// given back, or `timeout` passes; true when none is left. A guard
    /// dropped without `release`, a `lock` future dropped while it waited or
    /// issued, a release that failed retryably: each gives its ticket back
    /// in the background, and this waits for that too. Guards still alive,
    /// and `lock` futures still pending, count as not given back: drop them
    /// first. Call this before a process exits so it leaves no ticket behind
    /// (the in-memory store gives tickets back at once).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), ticketlock::LockError> {
    /// use std::time::Duration;
    /// let store = ticketlock::LockStore::in_memory();
    /// drop(store.lock("conv-1").await?);
    /// assert!(store.flush(Duration::from_secs(1)).await);
    /// # Ok(()) }
    /// ```
    pub async fn flush(&self, timeout: Duration) -> bool {
        let background = &self.inner.background;
        let waiting = async {
            loop {
                let done = background.done.notified();
                if background.running.load(Ordering::Acquire) == 0 {
                    return;
                }
                done.await;
            }
        };
        tokio::time::timeout(timeout, waiting).await.is_ok()
    }

    /// Whether a blocking release may try to reach the store: not within
    /// `pause` of one that found it unreachable.
    pub(crate) fn may_block_for_release(&self, pause: Duration) -> bool {
        let last = *self
            .inner
            .unreachable_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        last.is_none_or(|at| at.elapsed() >= pause)
    }

    /// A blocking release found the store unreachable.
    pub(crate) fn unreachable_for_release(&self) {
        *self
            .inner
            .unreachable_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }

    /// How to reach this store's Redis afresh (see [`LockGuard`]'s `## Behavior`).
    pub(crate) fn reconnect(&self) -> Option<Reconnect> {
        self.inner.reconnect.clone()
    }

    /// The lifetime tickets get when no other is given.
    pub fn default_lifetime(&self) -> Duration {
        self.inner.default_lifetime
    }

    /// A new, empty lock for `conversation_id` (not stored).
    pub fn create_lock(conversation_id: &str) -> TicketLock {
        TicketLock::new(conversation_id)
    }

    /// Appends a ticket to the conversation's queue and returns its number.
    /// The caller owns the ticket: end it with [`finish_serving`](Self::finish_serving)
    /// or [`cleanup`](Self::cleanup), or let it expire.
    ///
    /// If the call fails without knowing whether the store took the ticket
    /// (a timeout, a lost connection), the store is told to give it back, so
    /// no ticket nobody knows of blocks the queue.
    pub async fn issue_ticket(
        &self,
        conversation_id: &str,
        lifetime: Duration,
    ) -> Result<u64, LockError> {
        validate::conversation_id(conversation_id)?;
        let lifetime_ms = validate::lifetime_ms(lifetime, "lifetime")?;
        let issued = self.issue_once(conversation_id, lifetime_ms, None).await?;
        tracing::debug!(conversation_id, ticket = issued.ticket, "ticket issued");
        Ok(issued.ticket)
    }

    /// One issue; on an outcome the store may not have seen through (timeout,
    /// lost connection), the request is cancelled in the background.
    async fn issue_once(
        &self,
        cid: &str,
        lifetime_ms: u64,
        liveness_ms: Option<u64>,
    ) -> Result<crate::backend::Issued, LockError> {
        // Until the store's answer is in hand, the issue's outcome is
        // unknown: if this future is dropped (a timeout, a select!) or the
        // call fails without an answer, the request is cancelled, which gives
        // back the ticket it took, or makes sure it takes none.
        let request = (!self.backend().answers_at_once()).then(|| self.inner.requests.next());
        let mut unknown = request.as_ref().map(|request| UnknownIssue {
            store: self,
            cid,
            request: Some(request.clone()),
            _counted: self.track(),
        });
        let outcome = self
            .backend()
            .issue(
                cid,
                IssueArgs {
                    lifetime_ms,
                    liveness_ms,
                    request: request.as_deref(),
                },
            )
            .await;
        if let Some(unknown) = unknown.as_mut() {
            if !matches!(&outcome, Err(fault) if fault.may_have_run()) {
                unknown.request = None;
            }
        }
        drop(unknown);
        match outcome {
            Ok(Some(issued)) => Ok(issued),
            Ok(None) => Err(LockError::Backend {
                conversation_id: Some(cid.to_owned()),
                retryable: true,
                source: "the issue arrived after it had been cancelled".into(),
            }),
            Err(fault) => Err(fail(cid, fault)),
        }
    }

    /// Sends `cancel` for `request` until the store takes it (or for as long
    /// as the store would remember the request).
    fn cancel_in_background(&self, cid: &str, request: String) {
        let store = self.clone();
        let cid: Arc<str> = Arc::from(cid);
        let remember = self
            .backend()
            .call_timeout()
            .unwrap_or(DEFAULT_SOCKET_TIMEOUT)
            * REMEMBER_CANCELLED;
        let give_up = Instant::now() + remember;
        let _ = self.spawn_background(async move {
            let remember_ms = remember.as_millis() as u64;
            let mut pause = Duration::from_millis(50);
            loop {
                match store.backend().cancel(&cid, &request, remember_ms).await {
                    Ok(found) => {
                        tracing::debug!(conversation_id = &*cid, request, ticket = ?found, "cancelled an issue whose answer was lost");
                        return;
                    }
                    Err(e) if Instant::now() + pause < give_up => {
                        tracing::debug!(conversation_id = &*cid, request, error = ?e, "cancelling an issue failed; retrying");
                    }
                    Err(_) => return,
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Waits for the conversation's lock with the store's defaults. See [`lock_with`](Self::lock_with).
    pub async fn lock(&self, conversation_id: &str) -> Result<LockGuard, LockError> {
        self.lock_with(conversation_id, LockOptions::default())
            .await
    }

    /// Takes a ticket and waits until it is served.
    ///
    /// The ticket is a renewing one: while this future waits it checks in
    /// with the store (at least three times per dead-waiter timeout), so it
    /// keeps its place however long the queue; if the process dies, the queue
    /// moves on within the dead-waiter timeout. The lease (the lifetime) runs
    /// from the moment the lock is granted.
    ///
    /// Returns [`LockError::Expired`] as soon as the ticket is found expired
    /// or removed, and [`LockError::Timeout`] (ticket given back) when the
    /// options' timeout passes first, also while the store does not answer.
    ///
    /// # Cancel safety
    /// Dropping the returned future before it completes gives the ticket
    /// back (in the background), so the waiters behind it are not held up.
    /// That holds even while the ticket is being issued: on Redis the issue
    /// runs in its own task, which gives the ticket back if nobody is left to
    /// take it, and tells the store to cancel the request if its answer is
    /// lost. The in-memory store answers at once, so there is nothing to
    /// cancel half-way.
    pub async fn lock_with(
        &self,
        conversation_id: &str,
        options: LockOptions,
    ) -> Result<LockGuard, LockError> {
        validate::conversation_id(conversation_id)?;
        let options = if options == LockOptions::default() {
            self.inner.default_options
        } else {
            options.resolve(self.inner.default_lifetime)?
        };
        let started = Instant::now();
        if let AnyBackend::Memory(memory) = self.backend() {
            // The in-memory store answers at once: the issue runs right here
            // (nothing to cancel half-way, no task), and only a caller that
            // has to wait pays for the acquire loop's (boxed) future.
            let (ticket, served) =
                self.take_ticket_now(memory, conversation_id, &options, started)?;
            if let Some(grant) = served {
                tracing::debug!(
                    conversation_id,
                    ticket = ticket.number(),
                    fence = grant.fence,
                    "lock acquired"
                );
                return Ok(LockGuard::new(ticket, grant, &options));
            }
            return Box::pin(self.wait_for_grant(ticket, options, started)).await;
        }
        Box::pin(self.lock_via_store(conversation_id, options, started)).await
    }

    /// `lock_with` on a store that answers over the network: the issue runs
    /// in a task of its own, and every await is raced against the deadline.
    async fn lock_via_store(
        &self,
        conversation_id: &str,
        options: Resolved,
        started: Instant,
    ) -> Result<LockGuard, LockError> {
        let deadline = options.timeout.map(|t| started + t);
        let timed_out = |ticket| LockError::Timeout {
            conversation_id: conversation_id.to_owned(),
            ticket,
            waited: started.elapsed(),
        };
        // A zero timeout tries once: the issue's answer is awaited (for at
        // most the socket timeout), and only waiting is ruled out.
        let issue_deadline = deadline.filter(|_| options.timeout != Some(Duration::ZERO));
        let (ticket, served) =
            match within(issue_deadline, self.issue_owned(conversation_id, &options)).await {
                Some(issued) => issued?,
                None => return Err(timed_out(None)),
            };
        match served {
            Some(grant) => {
                tracing::debug!(conversation_id, ticket = ticket.number(), fence = grant.fence, waited = ?started.elapsed(), "lock acquired");
                Ok(LockGuard::new(ticket, grant, &options))
            }
            None => self.wait_for_grant(ticket, options, started).await,
        }
    }

    /// Waits until `ticket` is served; gives it back on a timeout.
    async fn wait_for_grant(
        &self,
        mut ticket: OwnedTicket,
        options: Resolved,
        started: Instant,
    ) -> Result<LockGuard, LockError> {
        let conversation_id = &*ticket.conversation_id.clone();
        let deadline = options.timeout.map(|t| started + t);
        let outcome = self.wait_until_served(&ticket, &options, deadline).await;
        match outcome {
            Ok(grant) => {
                tracing::debug!(conversation_id, ticket = ticket.number(), fence = grant.fence, waited = ?started.elapsed(), "lock acquired");
                Ok(LockGuard::new(ticket, grant, &options))
            }
            Err(Waited::Expired) => {
                tracing::debug!(
                    conversation_id,
                    ticket = ticket.number(),
                    "ticket expired while waiting"
                );
                ticket.forget();
                Err(LockError::Expired {
                    conversation_id: conversation_id.to_owned(),
                    ticket: ticket.number(),
                })
            }
            Err(Waited::TimedOut) => {
                // Give the ticket back now rather than on drop, so a caller
                // that retries at once queues behind nobody stale; but do not
                // let a stalled store hold the error up.
                let number = ticket.number();
                let _ = tokio::time::timeout(GIVE_BACK_GRACE, ticket.give_back()).await;
                Err(LockError::Timeout {
                    conversation_id: conversation_id.to_owned(),
                    ticket: Some(number),
                    waited: started.elapsed(),
                })
            }
            // The store just failed: the ticket's drop gives it back in the background.
            Err(Waited::Failed(e)) => Err(e),
        }
    }

    /// Runs `work` while holding the conversation's lock and releases it
    /// afterwards, also when `work` fails. Returns `work`'s output, or the
    /// error of acquiring or of releasing (a release error means the lease
    /// ran out while `work` ran, so someone else may have been served too).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), ticketlock::LockError> {
    /// use ticketlock::{LockOptions, LockStore};
    /// let store = LockStore::in_memory();
    /// let ticket = store
    ///     .with_lock("conv-1", LockOptions::default(), |ticket| async move { ticket })
    ///     .await?;
    /// assert_eq!(ticket, 0);
    /// # Ok(()) }
    /// ```
    pub async fn with_lock<T, F, Fut>(
        &self,
        conversation_id: &str,
        options: LockOptions,
        work: F,
    ) -> Result<T, LockError>
    where
        F: FnOnce(u64) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.lock_with(conversation_id, options).await?;
        let output = work(guard.ticket()).await;
        guard.release().await?;
        Ok(output)
    }

    /// A read-only snapshot of the conversation's queue (expired tickets left
    /// out), or `None` when the conversation has no record.
    pub async fn get_lock(&self, conversation_id: &str) -> Result<Option<TicketLock>, LockError> {
        let record = self
            .on(conversation_id, |b| b.read(conversation_id, None))
            .await?;
        Ok(record.map(|r| TicketLock::from_parts(conversation_id.to_owned(), r.tickets, r.next)))
    }

    /// The stored lock, or a new empty one (an empty lock needs no storage).
    pub async fn get_or_create_lock(&self, conversation_id: &str) -> Result<TicketLock, LockError> {
        Ok(self
            .get_lock(conversation_id)
            .await?
            .unwrap_or_else(|| Self::create_lock(conversation_id)))
    }

    /// Replaces the conversation's queue with `lock`'s tickets, atomically.
    /// Every ticket keeps the kind and terms it has in `lock` (a snapshot
    /// from [`get_lock`](Self::get_lock) saved back unchanged changes
    /// nothing, the current grant included). Ticket numbers never go down: the
    /// next ticket issued gets a number above both `lock`'s and the stored
    /// ones. Waiters whose tickets are left out get [`LockError::Expired`] at
    /// once; a holder whose ticket is left out sees [`LockGuard::lost`] resolve.
    pub async fn save_lock(&self, lock: &TicketLock) -> Result<(), LockError> {
        let cid = lock.conversation_id();
        validate::conversation_id(cid)?;
        if lock.next_number() > MAX_TICKET + 1
            || lock.tickets().iter().any(|t| t.number() > MAX_TICKET)
        {
            return Err(LockError::invalid(
                "ticket",
                format!(
                    "ticket numbers must stay below 2^53 (conversation {})",
                    crate::error::shown(cid)
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for t in lock.tickets() {
            let terms = [Some(t.expires_in()), t.lease(), t.dead_waiter_timeout()];
            if terms
                .into_iter()
                .flatten()
                .any(|d| d > validate::MAX_LIFETIME)
            {
                return Err(LockError::invalid(
                    "ticket",
                    format!(
                        "ticket {} lives {:?} or has terms longer than the maximum {:?}",
                        t.number(),
                        t.expires_in(),
                        validate::MAX_LIFETIME
                    ),
                ));
            }
            if t.lease().is_some_and(|d| d.is_zero())
                || t.dead_waiter_timeout().is_some_and(|d| d.is_zero())
            {
                return Err(LockError::invalid(
                    "ticket",
                    format!(
                        "renewing ticket {} needs a lease and a dead-waiter timeout above zero",
                        t.number()
                    ),
                ));
            }
            if !t.expires_in().is_zero() && !seen.insert(t.number()) {
                return Err(LockError::invalid(
                    "ticket",
                    format!("ticket {} appears twice", t.number()),
                ));
            }
        }
        self.backend().save(lock).await.map_err(|f| fail(cid, f))?;
        Ok(())
    }

    /// Deletes the conversation's record and every ticket in it; its waiters
    /// get [`LockError::Expired`], and its holder's [`LockGuard::lost`] resolves.
    pub async fn delete_lock(&self, conversation_id: &str) -> Result<(), LockError> {
        self.on(conversation_id, |b| b.delete(conversation_id))
            .await?;
        Ok(())
    }

    /// Removes expired tickets, handing the lock on if the served one expired.
    pub async fn update_lock(&self, conversation_id: &str) -> Result<(), LockError> {
        self.on(conversation_id, |b| b.update(conversation_id))
            .await?;
        Ok(())
    }

    /// True when the conversation's queue holds any live ticket (held or waiting).
    pub async fn is_someone_waiting(&self, conversation_id: &str) -> Result<bool, LockError> {
        let record = self
            .on(conversation_id, |b| b.read(conversation_id, Some(0)))
            .await?;
        Ok(record.is_some_and(|r| r.live > 0))
    }

    /// Removes ticket `ticket` (served or not); the next live ticket is served
    /// and its waiter woken. The conversation's record stays. The ticket's
    /// own waiter gets [`LockError::Expired`], or its holder sees
    /// [`LockGuard::lost`] resolve.
    pub async fn finish_serving(
        &self,
        conversation_id: &str,
        ticket: u64,
    ) -> Result<(), LockError> {
        self.release_number(conversation_id, ticket, ReleaseMode::Finish)
            .await
    }

    /// Like [`finish_serving`](Self::finish_serving), and deletes the
    /// conversation's record when no live ticket is left.
    pub async fn cleanup(&self, conversation_id: &str, ticket: u64) -> Result<(), LockError> {
        self.release_number(conversation_id, ticket, ReleaseMode::Cleanup)
            .await
    }

    async fn release_number(
        &self,
        cid: &str,
        number: u64,
        mode: ReleaseMode,
    ) -> Result<(), LockError> {
        let ticket = TicketRef {
            number,
            epoch: None,
        };
        let removal = Removal {
            ticket,
            mode,
            by: Remover::Admin,
        };
        self.on(cid, |b| b.release(cid, removal)).await?;
        Ok(())
    }

    /// Everything the store knows about one conversation, for operators
    /// (`ticketlock inspect`): read-only, so it works on a replica, under
    /// the minimal ACL, and on a Redis that is out of memory.
    pub async fn inspect(&self, conversation_id: &str) -> Result<Inspection, LockError> {
        self.on(conversation_id, |b| b.inspect(conversation_id, None))
            .await
    }

    /// One backend call about one conversation: the id is checked first,
    /// and a fault becomes that conversation's [`LockError`].
    pub(crate) async fn on<'a, T, F>(
        &'a self,
        conversation_id: &'a str,
        call: impl FnOnce(&'a AnyBackend) -> F,
    ) -> Result<T, LockError>
    where
        F: Future<Output = crate::backend::Result<T>>,
    {
        validate::conversation_id(conversation_id)?;
        call(self.backend())
            .await
            .map_err(|f| fail(conversation_id, f))
    }

    pub(crate) fn backend(&self) -> &AnyBackend {
        &self.inner.backend
    }

    /// The same store seen through a backend that injects faults (tests only).
    pub(crate) fn with_faults(
        &self,
        plan: impl Fn(crate::backend::faulty::Op) -> crate::backend::faulty::Injected
            + Send
            + Sync
            + 'static,
    ) -> LockStore {
        use crate::backend::faulty::FaultyBackend;
        let plan: crate::backend::faulty::Plan = Arc::new(plan);
        let backend = match &self.inner.backend {
            AnyBackend::Memory(b) => AnyBackend::FaultyMemory(FaultyBackend::new(b.clone(), plan)),
            AnyBackend::Redis(b) => AnyBackend::FaultyRedis(FaultyBackend::new(b.clone(), plan)),
            // Already faulty: the new plan replaces the old one.
            AnyBackend::FaultyMemory(b) => AnyBackend::FaultyMemory(b.with_plan(plan)),
            AnyBackend::FaultyRedis(b) => AnyBackend::FaultyRedis(b.with_plan(plan)),
        };
        Self::with_backend(backend, self.inner.default_lifetime)
    }

    /// Issues a renewing ticket; dropped while the issue is in flight, the
    /// request is cancelled (see `issue_once`), so no ticket is left behind.
    async fn issue_owned(
        &self,
        cid: &str,
        options: &Resolved,
    ) -> Result<(OwnedTicket, Option<Grant>), LockError> {
        self.take_ticket(Arc::from(cid), options.lifetime_ms, options.liveness_ms)
            .await
    }

    async fn take_ticket(
        &self,
        cid: Arc<str>,
        lifetime_ms: u64,
        liveness_ms: u64,
    ) -> Result<(OwnedTicket, Option<Grant>), LockError> {
        let sent = Instant::now();
        let issued = self
            .issue_once(&cid, lifetime_ms, Some(liveness_ms))
            .await?;
        Ok(self.owned(cid, issued, sent, liveness_ms))
    }

    /// The in-memory issue, at once; `sent` is also its clock's reading
    /// (unless a test moves that clock by hand).
    fn take_ticket_now(
        &self,
        memory: &crate::backend::memory::MemoryBackend,
        cid: &str,
        options: &Resolved,
        sent: Instant,
    ) -> Result<(OwnedTicket, Option<Grant>), LockError> {
        let (issued, name) = memory
            .issue_now(cid, options.lifetime_ms, Some(options.liveness_ms), sent)
            .map_err(|f| fail(cid, f))?;
        let issued = issued.expect("an issue without a request id is never cancelled");
        Ok(self.owned(name, issued, sent, options.liveness_ms))
    }

    /// The ticket `issued` made ours, and its grant if it was served at once.
    fn owned(
        &self,
        cid: Arc<str>,
        issued: crate::backend::Issued,
        sent: Instant,
        liveness_ms: u64,
    ) -> (OwnedTicket, Option<Grant>) {
        let ticket = TicketRef {
            number: issued.ticket,
            epoch: Some(issued.epoch),
        };
        tracing::debug!(
            conversation_id = &*cid,
            ticket = ticket.number,
            served = issued.fence.is_some(),
            "ticket issued"
        );
        // Until when the store keeps the ticket without us: its lease when
        // served, else its waiting expiry.
        let (until, grant) = match issued.fence {
            Some(fence) => {
                let until = sent + issued.head_remaining.unwrap_or_default();
                let grant = Grant {
                    fence,
                    until,
                    picked_up: true,
                };
                (until, Some(grant))
            }
            None => (sent + Duration::from_millis(liveness_ms), None),
        };
        (OwnedTicket::new(self.clone(), cid, ticket, until), grant)
    }

    /// The acquire loop: subscribe, then ask (which also checks in), then
    /// sleep until a wake-up, the head's expiry, the next check-in, or the
    /// deadline, whichever comes first. Every call to the store is raced
    /// against the deadline, so a stalled store cannot hold the caller past it.
    async fn wait_until_served(
        &self,
        ticket: &OwnedTicket,
        options: &Resolved,
        deadline: Option<Instant>,
    ) -> Result<Grant, Waited> {
        let cid = &*ticket.conversation_id;
        let me = ticket.ticket;
        let failed = |f| Waited::Failed(fail(cid, f));
        // Subscribe before asking: a hand-over after our question is then
        // pushed to us, and one before it shows in the answer.
        let mut subscription = Some(
            within(deadline, self.backend().subscribe(cid))
                .await
                .ok_or(Waited::TimedOut)?
                .map_err(failed)?,
        );
        // When the last check-in that found us waiting was sent: the store
        // kept our ticket at least `liveness` from then, and any grant came
        // after it.
        let liveness = Duration::from_millis(options.liveness_ms);
        let mut checked_in: Instant;
        let lease = options.lifetime();
        loop {
            let sent = Instant::now();
            let polled = within(deadline, self.backend().poll(cid, me))
                .await
                .ok_or(Waited::TimedOut)?
                .map_err(failed)?;
            let next_check = match polled {
                Polled::Served { fence, remaining } => {
                    return Ok(Grant {
                        fence,
                        until: sent + remaining,
                        picked_up: true,
                    })
                }
                Polled::Gone => return Err(Waited::Expired),
                Polled::Waiting {
                    ahead,
                    head_remaining,
                    own_remaining,
                } => {
                    checked_in = sent;
                    tracing::debug!(conversation_id = cid, ticket = me.number, ahead, "waiting");
                    // Check in well before our ticket would lapse.
                    let mut pause = options
                        .wait_time
                        .min(options.heartbeat())
                        .min(own_remaining / 2);
                    if let Some(head) = head_remaining {
                        pause = pause.min(head + PAST);
                    }
                    Instant::now() + pause
                }
            };
            let mut wake = deadline.map_or(next_check, |d| d.min(next_check));
            // Wait for a notice that concerns us, or the next check.
            loop {
                let notice = match subscription.as_mut() {
                    Some(sub) => tokio::select! {
                        biased;
                        n = sub.notices.recv() => Some(n),
                        _ = tokio::time::sleep_until(wake) => None,
                    },
                    None => {
                        tokio::time::sleep_until(wake).await;
                        None
                    }
                };
                match notice {
                    Some(Ok(notice)) if removes(&notice, me) => break,
                    Some(Ok(notice)) if grant_in(&notice, me).is_some() => {
                        let fence = grant_in(&notice, me).expect("just matched");
                        // The grant came after our last check-in, and its
                        // lease runs from the grant: both end no earlier than
                        // this. Too close to now, and a pick-up first is
                        // better than a guard that is lost at once.
                        let until = checked_in + liveness.min(lease);
                        if until > Instant::now() + liveness.min(lease) / 2 {
                            return Ok(Grant {
                                fence,
                                until,
                                picked_up: false,
                            });
                        }
                        break;
                    }
                    Some(Ok(Notice::Changed {
                        epoch,
                        serving: Some(head),
                        serving_left,
                        ..
                    })) if Some(epoch) == me.epoch && head < me.number => {
                        // Still behind. Check when the new head's grant runs
                        // out, in case its owner is dead.
                        if let Some(left) = serving_left {
                            wake = wake.min(Instant::now() + left + PAST);
                        }
                        continue;
                    }
                    Some(Ok(_)) | Some(Err(RecvError::Lagged(_))) => break,
                    Some(Err(RecvError::Closed)) => {
                        subscription = None;
                        break;
                    }
                    None => {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            return Err(Waited::TimedOut);
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// An issue whose outcome is not known yet; dropped while it still holds
/// its request id, it cancels that request in the background.
struct UnknownIssue<'a> {
    store: &'a LockStore,
    cid: &'a str,
    request: Option<String>,
    /// Counted for `flush` until the cancel (if any) is under way.
    _counted: Option<Running>,
}

impl Drop for UnknownIssue<'_> {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            self.store.cancel_in_background(self.cid, request);
        }
    }
}

/// How waiting ended, when it did not end in a grant.
enum Waited {
    Expired,
    TimedOut,
    Failed(LockError),
}

/// `future`, or `None` once `deadline` passes.
async fn within<T>(deadline: Option<Instant>, future: impl Future<Output = T>) -> Option<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future).await.ok(),
        None => Some(future.await),
    }
}

pub(crate) fn fail(conversation_id: &str, fault: crate::backend::Fault) -> LockError {
    fault.into_error(Some(conversation_id))
}
