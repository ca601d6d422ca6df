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
    fn with_backend(backend: AnyBackend, default_lifetime: Duration) -> Self {
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

    /// A store from a URL: `memory://`, `redis://[user:password@]host[:port][/db]`
    /// or `rediss://...` (TLS). Redis connects before this returns.
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
            .issue(conversation_id, lifetime_ms)
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
    /// Returns [`LockError::Expired`] as soon as the ticket is found expired
    /// or removed, and [`LockError::Timeout`] (ticket given back) when the
    /// options' timeout passes first.
    ///
    /// # Cancel safety
    /// Dropping the returned future before it completes gives the ticket
    /// back (in the background, on the current runtime), so the waiters
    /// behind it are not held up for its lifetime. That holds even while the
    /// ticket is being issued: the issue runs in its own task, which returns
    /// the ticket if nobody is left to take it.
    pub async fn lock_with(
        &self,
        conversation_id: &str,
        options: LockOptions,
    ) -> Result<LockGuard, LockError> {
        validate::conversation_id(conversation_id)?;
        let options = options.resolve(self.inner.default_lifetime)?;
        let started = Instant::now();
        let mut ticket = self
            .issue_owned(conversation_id, options.lifetime_ms)
            .await?;
        match self.wait_until_served(&ticket, &options, started).await {
            Ok(()) => {
                tracing::debug!(conversation_id, ticket = ticket.number(), waited = ?started.elapsed(), "lock acquired");
                Ok(LockGuard { ticket })
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
            Err(e) => {
                // Give the ticket back now rather than on drop, so a caller
                // that retries at once queues behind nobody stale.
                let _ = ticket.give_back().await;
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

    /// Issues a ticket in a task of its own: if the caller is cancelled while
    /// the issue is in flight, the task gives the ticket straight back.
    async fn issue_owned(&self, cid: &str, lifetime_ms: u64) -> Result<OwnedTicket, LockError> {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        let store = self.clone();
        let owned_cid = cid.to_owned();
        tokio::spawn(async move {
            let reply = store
                .backend()
                .issue(&owned_cid, lifetime_ms)
                .await
                .map(|issued| OwnedTicket {
                    store: store.clone(),
                    conversation_id: owned_cid.clone(),
                    ticket: TicketRef {
                        number: issued.ticket,
                        epoch: Some(issued.epoch),
                    },
                    served: issued.now_serving == issued.ticket,
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
                    served = ticket.served,
                    "ticket issued"
                );
                Ok(ticket)
            }
            Ok(Err(fault)) => Err(fail(cid, fault)),
            Err(_) => Err(LockError::Backend {
                conversation_id: Some(cid.to_owned()),
                retryable: true,
                source: "the task issuing the ticket stopped (runtime shutting down)".into(),
            }),
        }
    }

    /// The acquire loop: ask, then sleep until a wake-up, the head's or our
    /// own expiry, `wait_time`, or the deadline, whichever comes first.
    async fn wait_until_served(
        &self,
        ticket: &OwnedTicket,
        options: &Resolved,
        started: Instant,
    ) -> Result<(), LockError> {
        if ticket.served {
            return Ok(());
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
        // A tiny slack past an expiry, so the check after it sees it expired.
        const PAST: Duration = Duration::from_millis(2);
        loop {
            let polled = self
                .backend()
                .poll(cid, me)
                .await
                .map_err(|f| fail(cid, f))?;
            let next_check = match polled {
                Polled::Served => return Ok(()),
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
                    let mut pause = options.wait_time.min(own_remaining + PAST);
                    if let Some(head) = head_remaining {
                        pause = pause.min(head + PAST);
                    }
                    Instant::now() + pause
                }
            };
            let wake = deadline.map_or(next_check, |d| d.min(next_check));
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
                        removed,
                    })) if Some(epoch) == me.epoch => {
                        if removed == Some(me.number) {
                            break; // someone removed our ticket: ask to be sure
                        }
                        match serving {
                            // The script that sent this had just decided who
                            // is served: if it is us, no need to ask again.
                            Some(head) if head == me.number => return Ok(()),
                            Some(head) if head < me.number => continue, // still behind
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

/// A ticket this process owns; dropping it while armed gives it back.
#[derive(Debug)]
struct OwnedTicket {
    store: LockStore,
    conversation_id: String,
    ticket: TicketRef,
    /// Served straight away by the issue.
    served: bool,
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
            served: self.served,
            armed: false,
        };
        runtime.spawn(async move {
            let _ = owned.give_back().await;
        });
    }
}

/// Proof that this process holds a conversation's lock.
///
/// ## Behavior
/// - [`release`](Self::release)`.await` removes the ticket atomically and
///   wakes the next waiter; it reports whether the lease was still valid.
/// - Dropped inside a tokio runtime without `release`: the same release runs
///   in the background.
/// - Dropped outside any runtime: nothing can run; the ticket expires after
///   its lifetime and the next waiter is served then.
/// - Lease expiry: after its lifetime the ticket is pruned and the next
///   waiter served, whether or not this guard still exists. Keep critical
///   sections shorter than the lifetime.
#[must_use = "dropping the guard releases the lock at once"]
#[derive(Debug)]
pub struct LockGuard {
    ticket: OwnedTicket,
}

impl LockGuard {
    /// The ticket number this guard holds.
    pub fn ticket(&self) -> u64 {
        self.ticket.number()
    }

    /// The conversation this guard holds the lock of.
    pub fn conversation_id(&self) -> &str {
        &self.ticket.conversation_id
    }

    /// Releases the lock and wakes the next waiter. Returns
    /// [`LockError::Expired`] when the ticket had already expired or been
    /// removed (the lease was lost while held).
    pub async fn release(mut self) -> Result<(), LockError> {
        if self.ticket.give_back().await? {
            Ok(())
        } else {
            Err(LockError::Expired {
                conversation_id: self.ticket.conversation_id.clone(),
                ticket: self.ticket.number(),
            })
        }
    }
}

fn fail(conversation_id: &str, fault: Fault) -> LockError {
    backend_error(Some(conversation_id), fault)
}

fn backend_error(conversation_id: Option<&str>, fault: Fault) -> LockError {
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
                ),
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
