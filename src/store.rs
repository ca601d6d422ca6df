//! [`LockStore`]: the public handle, Rasa's method names, and the acquire loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::backend::memory::MemoryBackend;
use crate::backend::redis::RedisBackend;
use crate::backend::{AnyBackend, Backend, Fault, Polled, ReleaseMode, TicketRef};
use crate::config::{self, StoreConfig, StoreType};
use crate::error::LockError;
use crate::keys::KeySpace;
use crate::notify::Notice;
use crate::options::{self, LockOptions, Resolved, DEFAULT_LIFETIME};
use crate::ticket::TicketLock;
use crate::validate;

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

#[derive(Debug)]
struct Inner {
    backend: AnyBackend,
    default_lifetime: Duration,
}

impl LockStore {
    pub(crate) fn with_backend(backend: AnyBackend, default_lifetime: Duration) -> Self {
        LockStore {
            inner: Arc::new(Inner {
                backend,
                default_lifetime,
            }),
        }
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
        Self::with_backend(
            AnyBackend::Memory(MemoryBackend::default()),
            DEFAULT_LIFETIME,
        )
    }

    /// A store from a URL: `memory://`, `redis://[user:password@]host[:port][/db]`,
    /// `rediss://...` (TLS), `redis+cluster://h1:p1,h2:p2` (Redis Cluster) or
    /// `redis+sentinel://s1:p1,s2:p2/<service>` (Sentinel; `rediss+...` for
    /// TLS to the data nodes). Redis connects before this returns.
    pub async fn from_url(url: &str) -> Result<Self, LockError> {
        let lifetime = options::lifetime_from_env()?;
        if config::is_memory_url(url) {
            return Ok(Self::with_backend(
                AnyBackend::Memory(MemoryBackend::default()),
                lifetime,
            ));
        }
        Self::connect(config::target_from_url(url, None, None)?, lifetime).await
    }

    /// A store from Rasa-style configuration; `None` means in memory.
    pub async fn create(config: Option<&StoreConfig>) -> Result<Self, LockError> {
        let lifetime = options::lifetime_from_env()?;
        match config {
            Some(c) if c.store_type == StoreType::Redis => {
                Self::connect(config::target_from_config(c)?, lifetime).await
            }
            _ => Ok(Self::with_backend(
                AnyBackend::Memory(MemoryBackend::default()),
                lifetime,
            )),
        }
    }

    async fn connect(target: config::RedisTarget, lifetime: Duration) -> Result<Self, LockError> {
        if target.tls {
            // rustls needs a process-wide crypto provider; another may already be installed.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let backend = RedisBackend::connect(
            target.client,
            KeySpace::new(target.key_prefix),
            target.socket_timeout,
            target.script_mode,
        )
        .await
        .map_err(|e| backend_error(None, Fault::Redis(e)))?;
        Ok(Self::with_backend(AnyBackend::Redis(backend), lifetime))
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
    pub async fn issue_ticket(
        &self,
        conversation_id: &str,
        lifetime: Duration,
    ) -> Result<u64, LockError> {
        validate::conversation_id(conversation_id)?;
        let lifetime_ms = validate::lifetime_ms(lifetime, "lifetime")?;
        let issued = self
            .backend()
            .issue(conversation_id, lifetime_ms, None)
            .await
            .map_err(|f| fail(conversation_id, f))?;
        tracing::debug!(conversation_id, ticket = issued.ticket, "ticket issued");
        Ok(issued.ticket)
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
    /// options' timeout passes first.
    ///
    /// # Cancel safety
    /// Dropping the returned future before it completes gives the ticket
    /// back (in the background, on the current runtime), so the waiters
    /// behind it are not held up. That holds even while the ticket is being
    /// issued: the issue runs in its own task, which returns the ticket if
    /// nobody is left to take it.
    pub async fn lock_with(
        &self,
        conversation_id: &str,
        options: LockOptions,
    ) -> Result<LockGuard, LockError> {
        validate::conversation_id(conversation_id)?;
        let options = options.resolve(self.inner.default_lifetime)?;
        let started = Instant::now();
        let mut ticket = self.issue_owned(conversation_id, &options).await?;
        match self.wait_until_served(&ticket, &options, started).await {
            Ok(grant) => {
                tracing::debug!(conversation_id, ticket = ticket.number(), fence = grant.fence, waited = ?started.elapsed(), "lock acquired");
                if !grant.picked_up {
                    ticket.fence = Some(grant.fence);
                }
                Ok(LockGuard::new(ticket, grant, &options))
            }
            Err(e @ LockError::Expired { .. }) => {
                tracing::debug!(
                    conversation_id,
                    ticket = ticket.number(),
                    "ticket expired while waiting"
                );
                ticket.forget();
                Err(e)
            }
            Err(e @ LockError::Timeout { .. }) => {
                // Give the ticket back now rather than on drop, so a caller
                // that retries at once queues behind nobody stale.
                let _ = ticket.give_back().await;
                Err(e)
            }
            Err(e) => {
                // The store just failed: giving back could take another
                // socket timeout, so the ticket's drop does it in the background.
                drop(ticket);
                Err(e)
            }
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
        validate::conversation_id(conversation_id)?;
        let record = self
            .backend()
            .read(conversation_id, None)
            .await
            .map_err(|f| fail(conversation_id, f))?;
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
    /// Ticket numbers never go down: the next ticket issued gets a number above
    /// both `lock`'s and the stored ones.
    pub async fn save_lock(&self, lock: &TicketLock) -> Result<(), LockError> {
        let cid = lock.conversation_id();
        validate::conversation_id(cid)?;
        // Lua numbers are doubles: integers are exact up to 2^53.
        const MAX_NUMBER: u64 = (1 << 53) - 1;
        if lock.next_number() > MAX_NUMBER || lock.tickets().iter().any(|t| t.number() > MAX_NUMBER)
        {
            return Err(LockError::invalid(
                "ticket",
                format!(
                    "ticket numbers must stay below 2^53 (conversation {})",
                    crate::error::shown(cid)
                ),
            ));
        }
        for t in lock.tickets() {
            if t.expires_in() > validate::MAX_LIFETIME {
                return Err(LockError::invalid(
                    "ticket",
                    format!(
                        "ticket {} lives {:?}, longer than the maximum {:?}",
                        t.number(),
                        t.expires_in(),
                        validate::MAX_LIFETIME
                    ),
                ));
            }
        }
        self.backend().save(lock).await.map_err(|f| fail(cid, f))?;
        Ok(())
    }

    /// Deletes the conversation's record and every ticket in it; its waiters
    /// get [`LockError::Expired`].
    pub async fn delete_lock(&self, conversation_id: &str) -> Result<(), LockError> {
        validate::conversation_id(conversation_id)?;
        self.backend()
            .delete(conversation_id)
            .await
            .map_err(|f| fail(conversation_id, f))?;
        Ok(())
    }

    /// Removes expired tickets, handing the lock on if the served one expired.
    pub async fn update_lock(&self, conversation_id: &str) -> Result<(), LockError> {
        validate::conversation_id(conversation_id)?;
        self.backend()
            .update(conversation_id)
            .await
            .map_err(|f| fail(conversation_id, f))?;
        Ok(())
    }

    /// True when the conversation's queue holds any live ticket (held or waiting).
    pub async fn is_someone_waiting(&self, conversation_id: &str) -> Result<bool, LockError> {
        validate::conversation_id(conversation_id)?;
        let record = self
            .backend()
            .read(conversation_id, Some(0))
            .await
            .map_err(|f| fail(conversation_id, f))?;
        Ok(record.is_some_and(|r| r.live > 0))
    }

    /// Removes ticket `ticket` (served or not); the next live ticket is served
    /// and its waiter woken. The conversation's record stays.
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
        validate::conversation_id(cid)?;
        let ticket = TicketRef {
            number,
            epoch: None,
        };
        self.backend()
            .release(cid, ticket, mode)
            .await
            .map_err(|f| fail(cid, f))?;
        Ok(())
    }

    fn backend(&self) -> &AnyBackend {
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

    /// Issues a ticket in a task of its own: if the caller is cancelled while
    /// the issue is in flight, the task gives the ticket straight back.
    async fn issue_owned(&self, cid: &str, options: &Resolved) -> Result<OwnedTicket, LockError> {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        let store = self.clone();
        let owned_cid = cid.to_owned();
        let (lifetime_ms, liveness_ms) = (options.lifetime_ms, options.liveness_ms);
        tokio::spawn(async move {
            let reply = store
                .backend()
                .issue(&owned_cid, lifetime_ms, Some(liveness_ms))
                .await
                .map(|issued| OwnedTicket {
                    store: store.clone(),
                    conversation_id: owned_cid.clone(),
                    ticket: TicketRef {
                        number: issued.ticket,
                        epoch: Some(issued.epoch),
                    },
                    fence: issued.fence,
                    armed: true,
                });
            // If the receiver is gone, `reply` comes back and dropping its
            // ticket gives the ticket back.
            let _ = reply_tx.send(reply);
        });
        match reply_rx.await {
            Ok(Ok(ticket)) => {
                tracing::debug!(
                    conversation_id = cid,
                    ticket = ticket.number(),
                    served = ticket.fence.is_some(),
                    "ticket issued"
                );
                Ok(ticket)
            }
            Ok(Err(fault)) => Err(fail(cid, fault)),
            Err(_) => Err(LockError::Backend {
                conversation_id: Some(cid.to_owned()),
                retryable: true,
                source: "the task issuing the ticket ended without an answer (it panicked, or the runtime is shutting down)".into(),
            }),
        }
    }

    /// The acquire loop: ask (which also checks in), then sleep until a
    /// wake-up, the head's expiry, the next check-in, or the deadline,
    /// whichever comes first.
    async fn wait_until_served(
        &self,
        ticket: &OwnedTicket,
        options: &Resolved,
        started: Instant,
    ) -> Result<Grant, LockError> {
        if let Some(fence) = ticket.fence {
            return Ok(Grant {
                fence,
                picked_up: true,
                at: Instant::now(),
            });
        }
        let cid = ticket.conversation_id.as_str();
        let me = ticket.ticket;
        let deadline = options.timeout.map(|t| started + t);
        // Subscribe before asking: a hand-over after our question is then
        // pushed to us, and one before it shows in the answer.
        let mut subscription = Some(
            self.backend()
                .subscribe(cid)
                .await
                .map_err(|f| fail(cid, f))?,
        );
        // A tiny slack past the head's expiry, so the check after it sees it expired.
        const PAST: Duration = Duration::from_millis(2);
        loop {
            let polled = self
                .backend()
                .poll(cid, me)
                .await
                .map_err(|f| fail(cid, f))?;
            let next_check = match polled {
                Polled::Served { fence } => {
                    return Ok(Grant {
                        fence,
                        picked_up: true,
                        at: Instant::now(),
                    })
                }
                Polled::Gone => {
                    return Err(LockError::Expired {
                        conversation_id: cid.to_owned(),
                        ticket: me.number,
                    })
                }
                Polled::Waiting {
                    ahead,
                    head_remaining,
                    own_remaining,
                } => {
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
                    Some(Ok(Notice::Changed {
                        epoch,
                        serving,
                        fence,
                        removed,
                        serving_left,
                    })) if Some(epoch) == me.epoch => {
                        if removed == Some(me.number) {
                            break; // someone removed our ticket: ask to be sure
                        }
                        match (serving, fence) {
                            // The script that sent this had just granted the
                            // lock: if to us, no need to ask again (the grant
                            // is picked up in the background).
                            (Some(head), Some(fence)) if head == me.number => {
                                return Ok(Grant {
                                    fence,
                                    picked_up: false,
                                    at: Instant::now(),
                                })
                            }
                            (Some(head), _) if head < me.number => {
                                // Still behind. Check when the new head's
                                // grant runs out, in case its owner is dead.
                                if let Some(left) = serving_left {
                                    wake = wake.min(Instant::now() + left + PAST);
                                }
                                continue;
                            }
                            _ => break, // passed over or emptied: ask whether we are gone
                        }
                    }
                    Some(Ok(_)) | Some(Err(RecvError::Lagged(_))) => break,
                    Some(Err(RecvError::Closed)) => {
                        subscription = None;
                        break;
                    }
                    None => {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            return Err(LockError::Timeout {
                                conversation_id: cid.to_owned(),
                                ticket: me.number,
                                waited: started.elapsed(),
                            });
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// How the lock was granted.
#[derive(Debug, Clone, Copy)]
struct Grant {
    fence: u64,
    /// Whether the store knows we have it (issue or poll said so), or it
    /// was learnt from a wake-up and still has to be picked up.
    picked_up: bool,
    at: Instant,
}

/// A ticket this process owns; dropping it while armed gives it back.
#[derive(Debug)]
struct OwnedTicket {
    store: LockStore,
    conversation_id: String,
    ticket: TicketRef,
    /// The grant's fencing token once served.
    fence: Option<u64>,
    armed: bool,
}

impl OwnedTicket {
    fn number(&self) -> u64 {
        self.ticket.number
    }

    /// Nothing to give back (the ticket is gone already).
    fn forget(&mut self) {
        self.armed = false;
    }

    /// Removes the ticket now, and the record if nobody else is queued.
    async fn give_back(&mut self) -> Result<bool, LockError> {
        self.armed = false;
        let cid = self.conversation_id.as_str();
        let released = self
            .store
            .backend()
            .release(cid, self.ticket, ReleaseMode::Cleanup)
            .await
            .map_err(|f| fail(cid, f))?;
        tracing::debug!(
            conversation_id = cid,
            ticket = self.ticket.number,
            removed = released.removed,
            "ticket released"
        );
        Ok(released.removed)
    }
}

impl Drop for OwnedTicket {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Outside a runtime nothing can run; the ticket then simply expires.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut owned = OwnedTicket {
            store: self.store.clone(),
            conversation_id: std::mem::take(&mut self.conversation_id),
            ticket: self.ticket,
            fence: self.fence,
            armed: false,
        };
        runtime.spawn(async move {
            let _ = owned.give_back().await;
        });
    }
}

/// What this process knows of its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// Held until about this instant (the local estimate of the server's expiry).
    Until(Instant),
    /// Expired, removed, or granted to someone else.
    Lost,
}

/// Proof that this process holds a conversation's lock.
///
/// ## Behavior
/// - [`release`](Self::release)`.await` removes the ticket atomically and
///   wakes the next waiter; it reports whether the lease was still valid.
/// - Dropped inside a tokio runtime without `release`: the same release runs
///   in the background.
/// - Dropped outside any runtime: nothing can run; the lease runs out and
///   the next waiter is served then.
/// - Lease expiry: the lease (the lifetime) runs from the grant. Unless it is
///   renewed ([`LockOptions::with_auto_renew`](crate::LockOptions::with_auto_renew)
///   or [`extend`](Self::extend)), the store serves the next waiter when it
///   ends, whether or not this guard still exists. [`lost`](Self::lost)
///   resolves when that happens or a renewal finds the lease gone; protect
///   shared resources with [`fencing_token`](Self::fencing_token).
#[must_use = "dropping the guard releases the lock at once"]
#[derive(Debug)]
pub struct LockGuard {
    ticket: OwnedTicket,
    fence: u64,
    lease: Arc<tokio::sync::watch::Sender<Lease>>,
    /// Picks up a grant learnt from a wake-up, then renews if asked to.
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl LockGuard {
    fn new(ticket: OwnedTicket, grant: Grant, options: &Resolved) -> Self {
        let lifetime = options.lifetime();
        let (lease, _) = tokio::sync::watch::channel(Lease::Until(grant.at + lifetime));
        let lease = Arc::new(lease);
        let keeper = (!grant.picked_up || options.auto_renew).then(|| {
            let keeper = Keeper {
                store: ticket.store.clone(),
                conversation_id: ticket.conversation_id.clone(),
                ticket: ticket.ticket,
                fence: grant.fence,
                lease: lease.clone(),
            };
            tokio::spawn(keeper.run(!grant.picked_up, options.auto_renew.then_some(lifetime)))
        });
        LockGuard {
            ticket,
            fence: grant.fence,
            lease,
            keeper,
        }
    }

    /// The ticket number this guard holds.
    pub fn ticket(&self) -> u64 {
        self.ticket.number()
    }

    /// The conversation this guard holds the lock of.
    pub fn conversation_id(&self) -> &str {
        &self.ticket.conversation_id
    }

    /// This grant's fencing token: strictly greater than every earlier
    /// grant's of this conversation, also across `cleanup`, `delete_lock` and
    /// expired records. Pass it with every write to a shared resource and have
    /// the resource refuse tokens lower than the highest it has seen, so a
    /// holder whose lease ran out cannot overwrite its successor's work.
    pub fn fencing_token(&self) -> u64 {
        self.fence
    }

    /// Asks the store whether this guard still holds the lock.
    pub async fn is_held(&self) -> Result<bool, LockError> {
        if *self.lease.borrow() == Lease::Lost {
            return Ok(false);
        }
        let cid = self.conversation_id();
        let polled = self
            .ticket
            .store
            .backend()
            .poll(cid, self.ticket.ticket)
            .await
            .map_err(|f| fail(cid, f))?;
        let held = matches!(polled, Polled::Served { fence } if fence == self.fence);
        if !held {
            self.lease.send_replace(Lease::Lost);
        }
        Ok(held)
    }

    /// Renews the lease to `lease` from now. Returns [`LockError::Expired`]
    /// if it was already lost (it is never revived).
    pub async fn extend(&self, lease: Duration) -> Result<(), LockError> {
        let lease_ms = validate::lifetime_ms(lease, "lease")?;
        let keeper = self.keeper_view();
        keeper.extend(lease_ms).await
    }

    /// Resolves when the lease is lost: it ran out (by this process's clock)
    /// or a renewal or check found it gone. Meant for `tokio::select!`
    /// around the critical section.
    pub async fn lost(&self) {
        let mut lease = self.lease.subscribe();
        loop {
            let current = *lease.borrow_and_update();
            match current {
                Lease::Lost => return,
                Lease::Until(until) => {
                    tokio::select! {
                        changed = lease.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                        _ = tokio::time::sleep_until(until) => {
                            // Only a renewal can have moved the deadline meanwhile.
                            if *lease.borrow() == current {
                                self.lease.send_replace(Lease::Lost);
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Releases the lock and wakes the next waiter. Returns
    /// [`LockError::Expired`] when the ticket had already expired or been
    /// removed (the lease was lost while held).
    pub async fn release(mut self) -> Result<(), LockError> {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        if self.ticket.give_back().await? {
            Ok(())
        } else {
            Err(LockError::Expired {
                conversation_id: self.ticket.conversation_id.clone(),
                ticket: self.ticket.number(),
            })
        }
    }

    fn keeper_view(&self) -> Keeper {
        Keeper {
            store: self.ticket.store.clone(),
            conversation_id: self.ticket.conversation_id.clone(),
            ticket: self.ticket.ticket,
            fence: self.fence,
            lease: self.lease.clone(),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
    }
}

/// Looks after a held lease in the background: picks up a grant learnt from
/// a wake-up, and renews the lease every third of its lifetime if asked to.
struct Keeper {
    store: LockStore,
    conversation_id: String,
    ticket: TicketRef,
    fence: u64,
    lease: Arc<tokio::sync::watch::Sender<Lease>>,
}

impl Keeper {
    async fn run(self, pick_up: bool, renew: Option<Duration>) {
        if pick_up {
            let cid = self.conversation_id.as_str();
            match self.store.backend().poll(cid, self.ticket).await {
                Ok(Polled::Served { fence }) if fence == self.fence => {}
                // Picked up too late (or re-granted): the lease is gone.
                Ok(_) => {
                    self.lease.send_replace(Lease::Lost);
                    return;
                }
                // Not reachable: the lease stands until its local deadline.
                Err(_) => {}
            }
        }
        let Some(lifetime) = renew else { return };
        let lifetime_ms = lifetime.as_millis() as u64;
        loop {
            tokio::time::sleep(lifetime / 3).await;
            // A failed renewal is retried next round; the local deadline
            // (watched by `lost`) says when it is too late.
            match self.extend(lifetime_ms).await {
                Err(LockError::Expired { .. }) => return,
                _ => continue,
            }
        }
    }

    async fn extend(&self, lease_ms: u64) -> Result<(), LockError> {
        let cid = self.conversation_id.as_str();
        let asked = Instant::now();
        let extended = self
            .store
            .backend()
            .extend(cid, self.ticket.number, self.fence, lease_ms)
            .await
            .map_err(|f| fail(cid, f))?;
        match extended {
            Some(left) => {
                // Counted from when we asked: never later than the server's deadline.
                if *self.lease.borrow() != Lease::Lost {
                    self.lease.send_replace(Lease::Until(asked + left));
                }
                tracing::debug!(
                    conversation_id = cid,
                    ticket = self.ticket.number,
                    ?left,
                    "lease renewed"
                );
                Ok(())
            }
            None => {
                self.lease.send_replace(Lease::Lost);
                tracing::debug!(
                    conversation_id = cid,
                    ticket = self.ticket.number,
                    "lease lost"
                );
                Err(LockError::Expired {
                    conversation_id: cid.to_owned(),
                    ticket: self.ticket.number,
                })
            }
        }
    }
}

fn fail(conversation_id: &str, fault: Fault) -> LockError {
    backend_error(Some(conversation_id), fault)
}

pub(crate) fn backend_error(conversation_id: Option<&str>, fault: Fault) -> LockError {
    let conversation_id = conversation_id.map(str::to_owned);
    match fault {
        Fault::Foreign(detail) => LockError::Corrupted {
            conversation_id: conversation_id.unwrap_or_default(),
            detail,
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
        Fault::Redis(e) => LockError::Backend {
            conversation_id,
            retryable: !is_tls_failure(&e) && e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || matches!(
                    e.kind(),
                    redis::ErrorKind::Server(
                        redis::ServerErrorKind::BusyLoading
                            | redis::ServerErrorKind::TryAgain
                            | redis::ServerErrorKind::ClusterDown
                            | redis::ServerErrorKind::MasterDown
                            | redis::ServerErrorKind::ReadOnly
                    )
                )
                // A master short of the replicas it requires (min-replicas-to-write), as during a failover.
                || e.code() == Some("NOREPLICAS"),
            source: Box::new(e),
        },
    }
}

/// A TLS failure (untrusted certificate, wrong name) comes as an I/O error,
/// but retrying cannot fix it.
fn is_tls_failure(error: &redis::RedisError) -> bool {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    let is_tls = |e: &(dyn std::error::Error + 'static)| {
        // redis keeps I/O errors behind an Arc, and io::Error::source() skips
        // the error it wraps, so look inside both by hand.
        let e = e
            .downcast_ref::<Shared>()
            .map_or(e, |shared| &**shared as _);
        e.is::<rustls::Error>()
            || e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| inner.is::<rustls::Error>())
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if is_tls(e) {
            return true;
        }
        source = e.source();
    }
    false
}
