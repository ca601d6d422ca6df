//! Redis Sentinel: the master the sentinels name, followed across failovers.
//!
//! A `ConnectionManager` on the current master serves the calls; the
//! sentinels are asked again when they announce `+switch-master`, when the
//! master says it is none (any more), and while it does not answer (see
//! [`SentinelConn`]).

use std::collections::HashSet;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, ErrorKind, PushInfo, PushKind, RedisError, RedisResult, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::classify::{classify, Class};
use super::connection::{manager_config, within, Bounded};
use crate::notify::{Notice, Notifier};
use crate::scripts::{Call, Channels, Invoke};

/// How often at most the sentinels are asked again about the master.
const RESOLVE_INTERVAL: Duration = Duration::from_millis(200);

/// The master of a Sentinel deployment, followed across failovers.
///
/// Calls go to a `ConnectionManager` on the master the sentinels named last.
/// The sentinels are asked again:
/// - as soon as one of them announces `+switch-master` for our service
///   ([`follow_switches`]);
/// - when the master answers that it is none (any more): `READONLY` (it was
///   demoted), `MASTERDOWN`, or `NOREPLICAS` (it lost the replicas its
///   `min-replicas-to-write` asks for, e.g. because one was just promoted);
/// - in the background, when the connection is lost or a call goes
///   unanswered, and then every [`RESOLVE_INTERVAL`] while the master stays
///   unreachable.
///
/// One question at a time, and (but for `+switch-master`) at most every
/// [`RESOLVE_INTERVAL`]. When they name another master, a new
/// `ConnectionManager` replaces the old one, every channel with a listener
/// is subscribed there, and every waiter is told to recheck. A call refused
/// with one of the answers above changed nothing, so it is sent once more to
/// the new master; other failures are returned (the store reports them as
/// retryable) and the next call goes to the new master.
pub(crate) struct SentinelConn {
    resolver: tokio::sync::Mutex<Resolver>,
    current: RwLock<Current>,
    /// Channels subscribed on the current master. Held while subscribing and
    /// while switching masters, so every channel ends up on the new master.
    subscribed: tokio::sync::Mutex<HashSet<String>>,
    timeout: Duration,
    notifier: Arc<Notifier>,
    /// Wakes the background watcher (connection lost, or a call went unanswered).
    lost: Arc<Notify>,
}

pub(super) struct Resolver {
    pub(super) client: SentinelClient,
    pub(super) service: String,
    pub(super) sentinels: Vec<String>,
    /// When the sentinels were asked last.
    pub(super) last: Option<Instant>,
}

#[derive(Clone)]
struct Current {
    manager: ConnectionManager,
    /// `host:port` of the master.
    addr: String,
    /// Bumped on every switch.
    generation: u64,
}

/// What a failed call says about the master.
enum Verdict {
    /// Nothing to do with the master (a script error, foreign data...).
    Unrelated,
    /// The server answered that it cannot take writes: nothing was changed.
    NotMaster,
    /// No answer: the server may be gone.
    Unanswered,
}

fn verdict(e: &RedisError) -> Verdict {
    match classify(e) {
        Class::NotMaster => Verdict::NotMaster,
        Class::Unanswered | Class::Tls => Verdict::Unanswered,
        _ => Verdict::Unrelated,
    }
}

impl std::fmt::Debug for SentinelConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self
            .current
            .read()
            .map(|c| c.addr.clone())
            .unwrap_or_default();
        f.debug_struct("SentinelConn")
            .field("master", &current)
            .finish_non_exhaustive()
    }
}

impl Drop for SentinelConn {
    fn drop(&mut self) {
        // Ends the watcher (it finds nobody to watch for).
        self.lost.notify_one();
    }
}

impl SentinelConn {
    pub(super) async fn connect(
        mut resolver: Resolver,
        watchers: Vec<redis::Client>,
        timeout: Duration,
        notifier: Arc<Notifier>,
    ) -> RedisResult<Arc<SentinelConn>> {
        let lost = Arc::new(Notify::new());
        let (manager, addr) = open_master(&mut resolver.client, timeout, &notifier, &lost)
            .await
            .map_err(|e| {
                tracing::debug!(service = resolver.service, sentinels = ?resolver.sentinels, error = %e, "no master from the sentinels");
                if e.kind() == ErrorKind::MasterNameNotFoundBySentinel {
                    // Name the master and the sentinels asked: that is what is wrong.
                    RedisError::from((
                        e.kind(),
                        "the sentinels know no master by this name",
                        format!(
                            "{:?} (asked {})",
                            resolver.service,
                            resolver.sentinels.join(", ")
                        ),
                    ))
                } else {
                    e
                }
            })?;
        tracing::debug!(service = resolver.service, sentinels = ?resolver.sentinels, master = %addr, "connected to the master the sentinels name");
        resolver.last = Some(Instant::now());
        let conn = Arc::new(SentinelConn {
            resolver: tokio::sync::Mutex::new(resolver),
            current: RwLock::new(Current {
                manager,
                addr,
                generation: 0,
            }),
            subscribed: tokio::sync::Mutex::default(),
            timeout,
            notifier,
            lost: lost.clone(),
        });
        tokio::spawn(watch(Arc::downgrade(&conn), lost));
        let (sentinels, service) = {
            let resolver = conn.resolver.lock().await;
            (resolver.sentinels.clone(), resolver.service.clone())
        };
        tokio::spawn(follow_switches(
            Arc::downgrade(&conn),
            sentinels.into_iter().zip(watchers).collect(),
            service,
            timeout,
        ));
        Ok(conn)
    }

    fn current(&self) -> Current {
        // A panic elsewhere cannot leave `Current` half-written (it is replaced whole).
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn master(&self) -> Bounded<ConnectionManager> {
        Bounded::new(self.current().manager, self.timeout)
    }

    pub(super) async fn run(&self, call: Call<'_>, invoke: Invoke) -> RedisResult<Value> {
        let current = self.current();
        let mut manager = Bounded::new(current.manager.clone(), self.timeout);
        let result = call.run(&mut manager, invoke, Channels::Classic).await;
        let Err(e) = &result else {
            return result;
        };
        match verdict(e) {
            Verdict::Unrelated => result,
            Verdict::Unanswered => {
                self.lost.notify_one();
                result
            }
            Verdict::NotMaster => {
                if self.refresh(current.generation, false).await {
                    let mut master = self.master();
                    call.run(&mut master, invoke, Channels::Classic).await
                } else {
                    result
                }
            }
        }
    }

    pub(super) async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        let mut subscribed = self.subscribed.lock().await;
        let result = within(
            self.timeout,
            "SUBSCRIBE",
            self.current().manager.subscribe(channel),
        )
        .await;
        // Also after a failure: a switch of masters subscribes it again.
        subscribed.insert(channel.to_owned());
        if result
            .as_ref()
            .is_err_and(|e| !matches!(verdict(e), Verdict::Unrelated))
        {
            self.lost.notify_one();
        }
        result
    }

    pub(super) async fn unsubscribe(&self, channel: &str) -> RedisResult<()> {
        let mut subscribed = self.subscribed.lock().await;
        subscribed.remove(channel);
        within(
            self.timeout,
            "UNSUBSCRIBE",
            self.current().manager.unsubscribe(channel),
        )
        .await
    }

    /// Asks the sentinels for the master and switches to it if it moved.
    /// True when the master changed since generation `seen` (here or by
    /// someone else meanwhile). At most every [`RESOLVE_INTERVAL`] unless `now`.
    async fn refresh(&self, seen: u64, now: bool) -> bool {
        let mut resolver = self.resolver.lock().await;
        let current = self.current();
        if current.generation != seen {
            return true;
        }
        if !now
            && resolver
                .last
                .is_some_and(|last| last.elapsed() < RESOLVE_INTERVAL)
        {
            return false;
        }
        resolver.last = Some(Instant::now());
        let master = match within(
            self.timeout,
            "asking the sentinels for the master",
            resolver.client.async_get_client(),
        )
        .await
        {
            Ok(master) => master,
            Err(e) => {
                tracing::debug!(service = resolver.service, sentinels = ?resolver.sentinels, error = %e, "the sentinels named no master");
                return false;
            }
        };
        let addr = master.get_connection_info().addr().to_string();
        if addr == current.addr {
            return false;
        }
        let config = manager_config(self.timeout, self.notifier.clone(), Some(self.lost.clone()));
        let manager = match within(
            self.timeout,
            "connecting to the new master",
            master.get_connection_manager_with_config(config),
        )
        .await
        {
            Ok(manager) => manager,
            Err(e) => {
                tracing::debug!(service = resolver.service, master = %addr, error = %e, "cannot reach the new master yet");
                // Ask again at the next occasion rather than after the interval.
                resolver.last = None;
                return false;
            }
        };
        let subscribed = self.subscribed.lock().await;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Current {
            manager: manager.clone(),
            addr: addr.clone(),
            generation: seen + 1,
        };
        if !subscribed.is_empty() {
            let channels: Vec<&String> = subscribed.iter().collect();
            if let Err(e) = manager.clone().subscribe(&channels).await {
                // The waiters are told to recheck below, and poll meanwhile.
                tracing::debug!(error = %e, "resubscribing on the new master failed");
            }
        }
        drop(subscribed);
        tracing::info!(
            service = resolver.service,
            from = %current.addr,
            to = %addr,
            "the sentinels name a new master; switched to it"
        );
        self.notifier.send_all(Notice::Recheck);
        true
    }
}

/// Opens a `ConnectionManager` on the master the sentinels name.
async fn open_master(
    client: &mut SentinelClient,
    timeout: Duration,
    notifier: &Arc<Notifier>,
    lost: &Arc<Notify>,
) -> RedisResult<(ConnectionManager, String)> {
    let master = within(
        timeout,
        "asking the sentinels for the master",
        client.async_get_client(),
    )
    .await?;
    let addr = master.get_connection_info().addr().to_string();
    let config = manager_config(timeout, notifier.clone(), Some(lost.clone()));
    let manager = within(
        timeout,
        "connecting to the master",
        master.get_connection_manager_with_config(config),
    )
    .await?;
    Ok((manager, addr))
}

/// Re-resolves the master whenever the connection was lost or a call went
/// unanswered; ends once the connection is dropped.
async fn watch(conn: Weak<SentinelConn>, lost: Arc<Notify>) {
    loop {
        lost.notified().await;
        let Some(conn) = conn.upgrade() else {
            return;
        };
        let seen = conn.current().generation;
        if !conn.refresh(seen, false).await {
            // Too soon after the last question, or the sentinels still name
            // the same master (a failover takes them a moment): ask again
            // shortly, while the master stays unreachable.
            tokio::time::sleep(RESOLVE_INTERVAL).await;
            if conn.current().generation == seen && !conn.master_answers().await {
                conn.lost.notify_one();
            }
        }
    }
}

impl SentinelConn {
    /// True when the current master answers PING within the timeout.
    async fn master_answers(&self) -> bool {
        redis::cmd("PING")
            .query_async::<()>(&mut self.master())
            .await
            .is_ok()
    }
}

/// Listens on a sentinel's `+switch-master` channel (RESP3 pushes on a
/// connection of its own, to the first sentinel that answers) and switches
/// as soon as one announces a new master for our service: the old master
/// may go on accepting writes until Sentinel demotes it, seconds later, and
/// a store should not be among its writers. Ends once the connection is
/// dropped (checked every second).
async fn follow_switches(
    conn: Weak<SentinelConn>,
    sentinels: Vec<(String, redis::Client)>,
    service: String,
    timeout: Duration,
) {
    let mut attempt = 0usize;
    loop {
        if conn.strong_count() == 0 {
            return;
        }
        let (addr, client) = &sentinels[attempt % sentinels.len()];
        attempt += 1;
        let (pushes, mut received) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
        let subscribed = within(timeout, "subscribing to +switch-master", async {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_push_sender(pushes);
            let mut sentinel = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            sentinel.subscribe("+switch-master").await?;
            Ok(sentinel)
        })
        .await;
        let _sentinel = match subscribed {
            Ok(sentinel) => sentinel,
            Err(e) => {
                tracing::debug!(sentinel = %addr, error = %e, "cannot follow +switch-master here");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if attempt > 1 {
            // A switch may have been announced while nobody listened.
            if let Some(conn) = conn.upgrade() {
                let seen = conn.current().generation;
                conn.refresh(seen, true).await;
            }
        }
        loop {
            tokio::select! {
                push = received.recv() => match push {
                    Some(push) if push.kind == PushKind::Message => {
                        // "<service> <old ip> <old port> <new ip> <new port>"
                        let ours = matches!(
                            push.data.as_slice(),
                            [_, Value::BulkString(payload)]
                                if payload.split(|b| *b == b' ').next() == Some(service.as_bytes())
                        );
                        if let (true, Some(conn)) = (ours, conn.upgrade()) {
                            let seen = conn.current().generation;
                            conn.refresh(seen, true).await;
                        }
                    }
                    Some(push) if push.kind == PushKind::Disconnection => break,
                    Some(_) => {}
                    None => break,
                },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if conn.strong_count() == 0 {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(RESOLVE_INTERVAL).await;
    }
}
