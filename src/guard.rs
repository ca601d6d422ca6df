//! What a caller holds: an [`OwnedTicket`] while it waits, a [`LockGuard`]
//! once served, and the machinery that gives a ticket back whatever happens
//! to its owner (an explicit release, a drop, a cancelled future, a retryable
//! failure, a runtime shutting down).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::{AnyBackend, Backend, Polled, Removal, Renewal, TicketRef};
use crate::error::LockError;
use crate::notify::{Notice, Removed};
use crate::options::Resolved;
use crate::store::{fail, LockStore};
use crate::validate;

/// How long a blocking release (no runtime left to run it in the background)
/// may take at most, connecting included.
const BLOCKING_RELEASE_BOUND: Duration = Duration::from_secs(2);
/// The first pause before retrying a failed release or pick-up; it doubles
/// up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A ticket this process owns; dropping it while armed gives it back.
#[derive(Debug)]
pub(crate) struct OwnedTicket {
    pub(crate) store: LockStore,
    pub(crate) conversation_id: Arc<str>,
    pub(crate) ticket: TicketRef,
    /// Until when the store keeps the ticket at the latest without us (its
    /// lease, or its waiting expiry); a release is retried until then.
    pub(crate) until: Instant,
    armed: bool,
    /// Counted for [`LockStore::flush`] until given back.
    _counted: Option<crate::store::Running>,
}

impl OwnedTicket {
    pub(crate) fn new(
        store: LockStore,
        conversation_id: Arc<str>,
        ticket: TicketRef,
        until: Instant,
    ) -> Self {
        let _counted = store.track();
        OwnedTicket {
            store,
            conversation_id,
            ticket,
            until,
            armed: true,
            _counted,
        }
    }

    pub(crate) fn number(&self) -> u64 {
        self.ticket.number
    }

    /// Nothing to give back (the ticket is gone already).
    pub(crate) fn forget(&mut self) {
        self.armed = false;
    }

    fn releaser(&self) -> Releaser {
        Releaser {
            store: self.store.clone(),
            conversation_id: self.conversation_id.clone(),
            ticket: self.ticket,
            until: self.until,
        }
    }

    /// Removes the ticket (and the record if nobody else is queued); true
    /// when it was still live.
    ///
    /// Cancel-safe: on Redis the release runs in a task of its own, which
    /// finishes (retrying a retryable failure until the store would have
    /// dropped the ticket anyway) even if this future is dropped, or if the
    /// first attempt fails. The in-memory store answers at once.
    pub(crate) async fn give_back(&mut self) -> Result<bool, LockError> {
        self.armed = false;
        if let AnyBackend::Memory(memory) = self.store.backend() {
            let cid = &*self.conversation_id;
            let released = memory.release_now(cid, Removal::by_owner(self.ticket));
            tracing::debug!(
                conversation_id = cid,
                ticket = self.ticket.number,
                removed = released.removed,
                "ticket released"
            );
            return Ok(released.removed);
        }
        // Sent from here (no task to wait for on the common path); if this
        // future is dropped before the answer, or the answer is a retryable
        // failure, `pending` hands the release to a task that retries.
        let mut pending = Pending {
            releaser: Some(self.releaser()),
            in_task: false,
        };
        let result = pending.releaser.as_ref().expect("just set").once().await;
        let retry = matches!(&result, Err(e) if e.is_retryable());
        if !retry {
            pending.releaser = None;
        }
        result
    }
}

impl Drop for OwnedTicket {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let AnyBackend::Memory(memory) = self.store.backend() {
            memory.release_now(&self.conversation_id, Removal::by_owner(self.ticket));
            return;
        }
        self.releaser().spawn();
    }
}

/// Gives one ticket back, retrying retryable failures until `until`.
#[derive(Debug)]
struct Releaser {
    store: LockStore,
    conversation_id: Arc<str>,
    ticket: TicketRef,
    until: Instant,
}

impl Releaser {
    async fn once(&self) -> Result<bool, LockError> {
        let cid = &*self.conversation_id;
        let released = self
            .store
            .backend()
            .release(cid, Removal::by_owner(self.ticket))
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

    /// Runs in a task; without a runtime to run it (none, or one shutting
    /// down), the release blocks briefly instead (see [`Pending`]).
    fn spawn(self) {
        drop(Pending {
            releaser: Some(self),
            in_task: false,
        });
    }
}

/// A release under way. Dropped before it finished (the caller's future
/// cancelled, a retryable failure), it goes on in a task that retries until
/// the store would have dropped the ticket anyway. Without a runtime to run
/// that task (none, or one shutting down: the task is dropped unrun), it
/// gives the ticket back with a blocking call instead, so a bot that exits
/// gracefully leaves no lock held for a whole lease.
struct Pending {
    releaser: Option<Releaser>,
    /// Already the retrying task: dropped unfinished, block.
    in_task: bool,
}

impl Pending {
    async fn run(mut self) {
        let releaser = self.releaser.as_ref().expect("not run yet");
        let mut pause = FIRST_RETRY_PAUSE;
        loop {
            let result = releaser.once().await;
            let retry = matches!(&result, Err(e) if e.is_retryable())
                && Instant::now() + pause < releaser.until;
            if let Err(e) = &result {
                tracing::debug!(conversation_id = &*releaser.conversation_id, ticket = releaser.ticket.number, error = %e, retry, "releasing the ticket failed");
            }
            if !retry {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
        self.releaser = None;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(releaser) = self.releaser.take() else {
            return;
        };
        if releaser.until <= Instant::now() {
            return;
        }
        let releaser = if self.in_task {
            releaser
        } else {
            let store = releaser.store.clone();
            let task = Pending {
                releaser: Some(releaser),
                in_task: true,
            };
            match store.spawn_background(task.run()) {
                Ok(()) => return,
                // No runtime: the task's own drop (below, as `in_task`) blocks.
                Err(unrun) => {
                    drop(unrun);
                    return;
                }
            }
        };
        let Some(reconnect) = releaser.store.reconnect() else {
            return;
        };
        let store = releaser.store.clone();
        if !store.may_block_for_release(BLOCKING_RELEASE_BOUND * 5) {
            // The store was found unreachable a moment ago: the lease runs out.
            return;
        }
        // A runtime cannot be started inside another one's thread.
        let (done, wait) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("ticketlock-release".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async {
                    let released = tokio::time::timeout(BLOCKING_RELEASE_BOUND, async {
                        let store = reconnect().await?;
                        let again = Releaser { store, ..releaser };
                        again.once().await
                    })
                    .await;
                    tracing::debug!(?released, "released without a runtime to run in");
                    let _ = done.send(matches!(released, Ok(Ok(_))));
                });
            });
        let reached = spawned.is_ok()
            && wait
                .recv_timeout(BLOCKING_RELEASE_BOUND + Duration::from_millis(100))
                .unwrap_or(false);
        if !reached {
            store.unreachable_for_release();
        }
    }
}

/// How the lock was granted, and until when it holds by this process's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grant {
    pub(crate) fence: u64,
    /// The lease's end, never later than the store's: counted from when the
    /// request that told us was sent.
    pub(crate) until: Instant,
    /// Whether the store knows we have it (issue or poll said so), or it was
    /// learnt from a wake-up and still has to be picked up (by `pick_up_by`).
    pub(crate) picked_up: bool,
}

/// What this process knows of its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// Held until about this instant (never later than the server's expiry).
    Until(Instant),
    /// Expired, removed, or granted to someone else.
    Lost,
}

/// Proof that this process holds a conversation's lock.
///
/// ## Behavior
/// - [`release`](Self::release)`.await` removes the ticket atomically and
///   wakes the next waiter; it reports whether the lease was still valid. It
///   is cancel-safe: once called, the release completes even if the future
///   is dropped. A retryable failure (connection lost) is returned and the
///   release retried in the background until it succeeds or the lease ends.
/// - Dropped inside a tokio runtime without `release`: the same release runs
///   in the background.
/// - Dropped without a runtime, or while the runtime shuts down (a bot
///   exiting): the release is sent on a fresh connection from a short-lived
///   thread, blocking the drop for at most 2 s. If the store cannot be
///   reached within that, the lease runs out and the next waiter is served
///   then.
/// - Lease expiry: the lease (the lifetime) runs from the grant. Unless it is
///   renewed ([`LockOptions::with_auto_renew`](crate::LockOptions::with_auto_renew)
///   or [`extend`](Self::extend)), the store serves the next waiter when it
///   ends, whether or not this guard still exists. [`lost`](Self::lost)
///   resolves when that happens, when someone removes the ticket, or when a
///   renewal finds the lease gone; protect shared resources with
///   [`fencing_token`](Self::fencing_token).
#[must_use = "dropping the guard releases the lock at once"]
#[derive(Debug)]
pub struct LockGuard {
    ticket: OwnedTicket,
    fence: u64,
    /// The lease as the grant left it, until something watches it.
    granted_until: Instant,
    /// Made when something first watches the lease (`lost`, a check, the
    /// keeper), so the plain lock-and-release path allocates nothing for it.
    lease: std::sync::OnceLock<Arc<watch::Sender<Lease>>>,
    /// Picks up a grant learnt from a wake-up, then renews if asked to.
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl LockGuard {
    pub(crate) fn new(ticket: OwnedTicket, grant: Grant, options: &Resolved) -> Self {
        let mut guard = LockGuard {
            ticket,
            fence: grant.fence,
            granted_until: grant.until,
            lease: std::sync::OnceLock::new(),
            keeper: None,
        };
        guard.ticket.until = guard.ticket.until.max(grant.until);
        if !grant.picked_up || options.auto_renew {
            let keeper = guard.keeper();
            let renew = options.auto_renew.then(|| options.lifetime());
            guard.keeper = Some(tokio::spawn(keeper.run(!grant.picked_up, renew)));
        }
        guard
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

    /// Asks the store whether this guard still holds the lock (and, if so,
    /// learns how long its lease has left).
    pub async fn is_held(&self) -> Result<bool, LockError> {
        if *self.lease().borrow() == Lease::Lost {
            return Ok(false);
        }
        self.keeper().check().await
    }

    /// Renews the lease to `lease` from now. Returns [`LockError::Expired`]
    /// if it was already lost (it is never revived).
    pub async fn extend(&self, lease: Duration) -> Result<(), LockError> {
        let lease_ms = validate::lifetime_ms(lease, "lease")?;
        self.keeper().extend(lease_ms).await
    }

    /// Resolves when the lease is lost: it ran out (by this process's clock,
    /// which never runs behind the store's), someone removed the ticket
    /// (`finish_serving`, `delete_lock`, `save_lock`: the store says so at
    /// once), or a renewal or check found it gone. Meant for
    /// `tokio::select!` around the critical section.
    ///
    /// # Cancel safety
    /// Dropping the future only stops listening.
    pub async fn lost(&self) {
        let mut lease = self.lease().subscribe();
        if *lease.borrow_and_update() == Lease::Lost {
            return;
        }
        let keeper = self.keeper();
        let cid = &*self.ticket.conversation_id;
        // Listen for a wake-up saying the ticket left, then ask once: it may
        // have left before we listened.
        let mut notices = match self.ticket.store.backend().subscribe(cid).await {
            Ok(subscription) => {
                if let Ok(false) = keeper.check().await {
                    return;
                }
                Some(subscription)
            }
            Err(_) => None,
        };
        loop {
            let current = *lease.borrow_and_update();
            let Lease::Until(until) = current else {
                return;
            };
            let notice = async {
                match notices.as_mut() {
                    Some(s) => Some(s.notices.recv().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = lease.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(until) => {
                    // Only a renewal can have moved the deadline meanwhile.
                    if *lease.borrow() == current {
                        self.lease().send_replace(Lease::Lost);
                        return;
                    }
                }
                notice = notice => match notice {
                    Some(Ok(Notice::Changed { epoch, serving, fence, .. }))
                        if Some(epoch) == self.ticket.ticket.epoch =>
                    {
                        if serving != Some(self.ticket.number()) || fence.is_some_and(|f| f != self.fence) {
                            keeper.lost("removed or served to another");
                            return;
                        }
                    }
                    // Another record: ours was deleted.
                    Some(Ok(Notice::Changed { .. })) => {
                        keeper.lost("its record was deleted");
                        return;
                    }
                    // Messages may have been missed: ask.
                    Some(Ok(Notice::Recheck)) | Some(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                        if let Ok(false) = keeper.check().await {
                            return;
                        }
                    }
                    Some(Err(tokio::sync::broadcast::error::RecvError::Closed)) | None => notices = None,
                },
            }
        }
    }

    /// Releases the lock and wakes the next waiter. Returns
    /// [`LockError::Expired`] when the ticket had already expired or been
    /// removed (the lease was lost while held). See the type's `## Behavior`
    /// for cancellation and retryable failures.
    pub async fn release(mut self) -> Result<(), LockError> {
        self.stop_keeping();
        if self.ticket.give_back().await? {
            Ok(())
        } else {
            Err(LockError::Expired {
                conversation_id: self.ticket.conversation_id.to_string(),
                ticket: self.ticket.number(),
            })
        }
    }

    fn lease(&self) -> &Arc<watch::Sender<Lease>> {
        self.lease
            .get_or_init(|| Arc::new(watch::channel(Lease::Until(self.granted_until)).0))
    }

    fn keeper(&self) -> Keeper {
        Keeper {
            store: self.ticket.store.clone(),
            conversation_id: self.ticket.conversation_id.clone(),
            ticket: self.ticket.ticket,
            fence: self.fence,
            lease: self.lease().clone(),
        }
    }
}

impl LockGuard {
    /// Stops the keeper; a release from here on is retried until the lease
    /// as last renewed would end.
    fn stop_keeping(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        if let Some(Lease::Until(until)) = self.lease.get().map(|l| *l.borrow()) {
            self.ticket.until = self.ticket.until.max(until);
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Then the ticket's own drop gives it back.
        self.stop_keeping();
    }
}

/// Looks after a held lease: picks up a grant learnt from a wake-up, renews
/// the lease every third of its lifetime if asked to, and keeps the local
/// deadline no later than the store's.
struct Keeper {
    store: LockStore,
    conversation_id: Arc<str>,
    ticket: TicketRef,
    fence: u64,
    lease: Arc<watch::Sender<Lease>>,
}

impl Keeper {
    async fn run(self, pick_up: bool, renew: Option<Duration>) {
        if pick_up && !self.pick_up().await {
            return;
        }
        let Some(lifetime) = renew else { return };
        let lifetime_ms = lifetime.as_millis() as u64;
        loop {
            tokio::time::sleep(lifetime / 3).await;
            // A failed renewal is retried next round; the local deadline
            // (watched by `lost`) says when it is too late.
            if let Err(LockError::Expired { .. }) = self.extend(lifetime_ms).await {
                return;
            }
        }
    }

    /// Picks the grant up, retrying failures until the lease could have
    /// ended; false when the lease is lost.
    async fn pick_up(&self) -> bool {
        let mut pause = FIRST_RETRY_PAUSE;
        loop {
            match self.check().await {
                Ok(held) => return held,
                Err(e) => {
                    let until = match *self.lease.borrow() {
                        Lease::Until(until) => until,
                        Lease::Lost => return false,
                    };
                    if Instant::now() + pause >= until {
                        self.lost("its grant could not be picked up in time");
                        return false;
                    }
                    tracing::debug!(conversation_id = &*self.conversation_id, ticket = self.ticket.number, error = %e, "picking the grant up failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_RETRY_PAUSE);
                }
            }
        }
    }

    /// Asks the store (a poll: also the pick-up); true while held, with the
    /// deadline set from the answer.
    async fn check(&self) -> Result<bool, LockError> {
        let cid = &*self.conversation_id;
        let sent = Instant::now();
        let polled = self
            .store
            .backend()
            .poll(cid, self.ticket)
            .await
            .map_err(|f| fail(cid, f))?;
        match polled {
            Polled::Served { fence, remaining } if fence == self.fence => {
                self.set_until(sent + remaining);
                Ok(true)
            }
            _ => {
                self.lost("the store no longer serves it");
                Ok(false)
            }
        }
    }

    async fn extend(&self, lease_ms: u64) -> Result<(), LockError> {
        let cid = &*self.conversation_id;
        // Once lost (by the store's word or by this process's clock, which
        // runs ahead of the store's), a lease is never taken up again.
        if *self.lease.borrow() == Lease::Lost {
            return Err(LockError::Expired {
                conversation_id: cid.to_owned(),
                ticket: self.ticket.number,
            });
        }
        let sent = Instant::now();
        let extended = self
            .store
            .backend()
            .extend(
                cid,
                Renewal {
                    ticket: self.ticket.number,
                    fence: self.fence,
                    lease_ms,
                },
            )
            .await
            .map_err(|f| fail(cid, f))?;
        match extended {
            Some(left) => {
                self.set_until(sent + left);
                tracing::debug!(
                    conversation_id = cid,
                    ticket = self.ticket.number,
                    ?left,
                    "lease renewed"
                );
                Ok(())
            }
            None => {
                self.lost("a renewal found it gone");
                Err(LockError::Expired {
                    conversation_id: cid.to_owned(),
                    ticket: self.ticket.number,
                })
            }
        }
    }

    /// Counted from when we asked: never later than the server's deadline.
    fn set_until(&self, until: Instant) {
        self.lease.send_if_modified(|lease| match lease {
            Lease::Until(current) if *current != until => {
                *current = until;
                true
            }
            _ => false,
        });
    }

    fn lost(&self, why: &str) {
        if self.lease.send_replace(Lease::Lost) != Lease::Lost {
            tracing::debug!(
                conversation_id = &*self.conversation_id,
                ticket = self.ticket.number,
                why,
                "lease lost"
            );
        }
    }
}

/// The notice that names `ticket` as served now, if this one does.
pub(crate) fn grant_in(notice: &Notice, ticket: TicketRef) -> Option<u64> {
    match *notice {
        Notice::Changed {
            epoch,
            serving: Some(serving),
            fence: Some(fence),
            ..
        } if Some(epoch) == ticket.epoch && serving == ticket.number => Some(fence),
        _ => None,
    }
}

/// True when the notice says `ticket` (a waiting one) was taken out.
pub(crate) fn removes(notice: &Notice, ticket: TicketRef) -> bool {
    matches!(*notice, Notice::Changed { epoch, removed, .. }
        if Some(epoch) == ticket.epoch
            && (removed == Removed::Ticket(ticket.number) || removed == Removed::Several))
}
