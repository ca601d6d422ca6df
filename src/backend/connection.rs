//! How the Redis backend reaches its data: one server, a Redis Cluster, or
//! the master that a set of Sentinels names.
//!
//! Every form is one multiplexed, reconnecting RESP3 connection whose
//! pub/sub messages arrive as pushes (forwarded to the [`Notifier`]) while
//! commands keep flowing:
//!
//! - **standard**: redis-rs's `ConnectionManager`, which reconnects and
//!   resubscribes by itself;
//! - **cluster**: redis-rs's async cluster connection. Scripts carry the
//!   conversation's keys (one hash slot), so each runs on the shard that owns
//!   them; wake-ups use sharded pub/sub (`SSUBSCRIBE`, and `SPUBLISH` in the
//!   scripts' sharded variant), so they stay on that shard; the connection
//!   follows slot moves and resubscribes;
//! - **sentinel**: a `ConnectionManager` to the master the sentinels name,
//!   replaced when they name another one (see [`SentinelConn`]).
//!
//! Any lost connection may have lost messages, so it tells every local
//! waiter to ask the store again.

use std::collections::HashSet;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{
    AsyncConnectionConfig, ConnectionInfo, ErrorKind, IntoConnectionInfo, ProtocolVersion,
    PushInfo, PushKind, RedisError, RedisResult, ServerErrorKind, TlsCertificates, Value,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::notify::{Notice, Notifier};
use crate::scripts::{self, Channels, Invoke, Script};

/// How to reach the data, as the configuration described it (not connected yet).
pub(crate) enum Connector {
    /// One server.
    Standard(redis::Client),
    /// A Redis Cluster through its startup nodes (RESP3 set on each).
    Cluster {
        nodes: Vec<ConnectionInfo>,
        certs: Option<TlsCertificates>,
    },
    /// The master the sentinels name for `service`.
    Sentinel {
        client: SentinelClient,
        service: String,
        /// `host:port` of each sentinel (for messages).
        sentinels: Vec<String>,
    },
}

/// A connected backend connection; cloning shares it.
#[derive(Clone)]
pub(crate) enum Conn {
    Standard(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

impl Conn {
    /// Connects; calls and the connecting itself are bounded by `timeout`.
    pub(crate) async fn connect(
        connector: Connector,
        timeout: Duration,
        notifier: Arc<Notifier>,
    ) -> RedisResult<Conn> {
        match connector {
            Connector::Standard(client) => {
                let config = manager_config(timeout, notifier, None);
                let conn = client.get_connection_manager_with_config(config).await?;
                Ok(Conn::Standard(conn))
            }
            Connector::Cluster { nodes, certs } => {
                let first = nodes.first().cloned();
                let mut builder = ClusterClientBuilder::new(nodes)
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .push_sender(move |push: PushInfo| {
                        forward(&notifier, push);
                        Ok::<(), std::convert::Infallible>(())
                    });
                if let Some(certs) = &certs {
                    builder = builder.certs(certs.clone());
                }
                let client = builder.build()?;
                // Each node's connect is bounded by `timeout`; this bounds the whole.
                match within(
                    timeout * 2,
                    "connecting to the cluster",
                    client.get_async_connection(),
                )
                .await
                {
                    Ok(conn) => Ok(Conn::Cluster(conn)),
                    Err(e) => Err(match first {
                        Some(node) => diagnose(node, certs, timeout).await.unwrap_or(e),
                        None => e,
                    }),
                }
            }
            Connector::Sentinel {
                client,
                service,
                sentinels,
            } => Ok(Conn::Sentinel(
                SentinelConn::connect(
                    Resolver {
                        client,
                        service,
                        sentinels,
                        last: None,
                    },
                    timeout,
                    notifier,
                )
                .await?,
            )),
        }
    }

    /// Which pub/sub the scripts must announce on for this deployment.
    pub(crate) fn channels(&self) -> Channels {
        match self {
            Conn::Cluster(_) => Channels::Sharded,
            Conn::Standard(_) | Conn::Sentinel(_) => Channels::Classic,
        }
    }

    /// Runs `script` (see [`Script::run`]).
    pub(crate) async fn run(
        &self,
        script: &Script,
        invoke: Invoke,
        keys: &[String],
        args: &[String],
    ) -> RedisResult<Value> {
        let channels = self.channels();
        match self {
            Conn::Standard(c) => {
                script
                    .run(&mut c.clone(), invoke, channels, keys, args)
                    .await
            }
            Conn::Cluster(c) => {
                script
                    .run(&mut c.clone(), invoke, channels, keys, args)
                    .await
            }
            // Boxed: the store's futures nest deep enough as they are.
            Conn::Sentinel(s) => Box::pin(s.run(script, invoke, keys, args)).await,
        }
    }

    /// Loads the Functions library (on every primary of a cluster).
    pub(crate) async fn load_library(&self) -> RedisResult<String> {
        let channels = self.channels();
        match self {
            Conn::Standard(c) => scripts::load_library(&mut c.clone(), channels).await,
            Conn::Cluster(c) => scripts::load_library(&mut c.clone(), channels).await,
            Conn::Sentinel(s) => {
                let mut master = s.master();
                scripts::load_library(&mut master, channels).await
            }
        }
    }

    pub(crate) async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        match self {
            Conn::Standard(c) => c.clone().subscribe(channel).await,
            Conn::Cluster(c) => c.clone().ssubscribe(channel).await,
            Conn::Sentinel(s) => s.subscribe(channel).await,
        }
    }

    pub(crate) async fn unsubscribe(&self, channel: &str) -> RedisResult<()> {
        match self {
            Conn::Standard(c) => c.clone().unsubscribe(channel).await,
            Conn::Cluster(c) => c.clone().sunsubscribe(channel).await,
            Conn::Sentinel(s) => s.unsubscribe(channel).await,
        }
    }
}

/// Why a cluster could not be reached, told by connecting to a startup node
/// directly: the cluster client reports every failure as an I/O error whose
/// message alone names the cause, so an untrusted certificate or a wrong
/// password would look retryable. `None` when the node can be reached.
async fn diagnose(
    node: ConnectionInfo,
    certs: Option<TlsCertificates>,
    timeout: Duration,
) -> Option<RedisError> {
    let client = match certs {
        Some(certs) => redis::Client::build_with_tls(node, certs),
        None => redis::Client::open(node),
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    match client {
        Ok(client) => within(
            timeout,
            "connecting to a startup node",
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .err(),
        Err(e) => Some(e),
    }
}

/// Routes a push to the waiters of its channel.
fn forward(notifier: &Notifier, push: PushInfo) {
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            if let [Value::BulkString(channel), Value::BulkString(payload)] = push.data.as_slice() {
                if let Ok(channel) = std::str::from_utf8(channel) {
                    notifier.send(channel, Notice::parse(payload));
                }
            }
        }
        // A cluster node drops sharded subscriptions whose slot moved away;
        // the connection resubscribes on the new owner, but messages may have
        // been missed meanwhile. (Our own unsubscribes land here too, when
        // nobody listens any more: harmless.)
        PushKind::SUnsubscribe => {
            if let Some(Value::BulkString(channel)) = push.data.first() {
                if let Ok(channel) = std::str::from_utf8(channel) {
                    notifier.send(channel, Notice::Recheck);
                }
            }
        }
        PushKind::Disconnection => notifier.send_all(Notice::Recheck),
        _ => {}
    }
}

/// A `ConnectionManager` configuration: bounded calls, RESP3 pushes to the
/// notifier, resubscription after reconnects; `lost` is told of every
/// disconnection.
fn manager_config(
    timeout: Duration,
    notifier: Arc<Notifier>,
    lost: Option<Arc<Notify>>,
) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
        .set_automatic_resubscription()
        .set_push_sender(move |push: PushInfo| {
            if push.kind == PushKind::Disconnection {
                if let Some(lost) = &lost {
                    lost.notify_one();
                }
            }
            forward(&notifier, push);
            Ok::<(), std::convert::Infallible>(())
        })
}

/// `future`, or a (retryable) timeout error after `limit`.
async fn within<T>(
    limit: Duration,
    what: &str,
    future: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} took longer than {limit:?}"),
        ))),
    }
}

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

struct Resolver {
    client: SentinelClient,
    service: String,
    sentinels: Vec<String>,
    /// When the sentinels were asked last.
    last: Option<Instant>,
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
    if matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    ) || e.code() == Some("NOREPLICAS")
    {
        Verdict::NotMaster
    } else if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
    {
        Verdict::Unanswered
    } else {
        Verdict::Unrelated
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
    async fn connect(
        mut resolver: Resolver,
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
            sentinels,
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

    fn master(&self) -> ConnectionManager {
        self.current().manager
    }

    async fn run(
        &self,
        script: &Script,
        invoke: Invoke,
        keys: &[String],
        args: &[String],
    ) -> RedisResult<Value> {
        let current = self.current();
        let result = script
            .run(
                &mut current.manager.clone(),
                invoke,
                Channels::Classic,
                keys,
                args,
            )
            .await;
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
                    script
                        .run(&mut master, invoke, Channels::Classic, keys, args)
                        .await
                } else {
                    result
                }
            }
        }
    }

    async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        let mut subscribed = self.subscribed.lock().await;
        let result = self.master().subscribe(channel).await;
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

    async fn unsubscribe(&self, channel: &str) -> RedisResult<()> {
        let mut subscribed = self.subscribed.lock().await;
        subscribed.remove(channel);
        self.master().unsubscribe(channel).await
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
        let mut master = self.master();
        within(self.timeout, "PING", async {
            redis::cmd("PING").query_async::<()>(&mut master).await
        })
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
    sentinels: Vec<String>,
    service: String,
    timeout: Duration,
) {
    let mut attempt = 0usize;
    loop {
        if conn.strong_count() == 0 {
            return;
        }
        let addr = &sentinels[attempt % sentinels.len()];
        attempt += 1;
        let (pushes, mut received) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
        let subscribed = within(timeout, "subscribing to +switch-master", async {
            let info = format!("redis://{addr}/").into_connection_info()?;
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            let client = redis::Client::open(info.set_redis_settings(settings))?;
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
