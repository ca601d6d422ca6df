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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, Pipeline, ProtocolVersion, PushInfo, PushKind,
    RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
};
use tokio::sync::Notify;

use super::classify::{classify, is_server_reply, Class};
use super::sentinel::{Resolver, SentinelConn};
use crate::keys::KeySpace;
use crate::notify::{Notice, Notifier};
use crate::scripts::{self, Call, Channels, Invoke};

/// How to reach the data, as the configuration described it (not connected
/// yet); built by [`connect`](super::connect).
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
        /// A RESP3 client of each sentinel (credentials and TLS included),
        /// to follow `+switch-master` announcements.
        watchers: Vec<redis::Client>,
    },
}

/// A connection whose every call ends within `timeout`, waiting for a
/// reconnect included: redis-rs bounds the reconnect and the reply each,
/// and a call after a lost connection would wait for both.
#[derive(Clone)]
pub(crate) struct Bounded<C> {
    inner: C,
    timeout: Duration,
}

impl<C> Bounded<C> {
    pub(super) fn new(inner: C, timeout: Duration) -> Self {
        Bounded { inner, timeout }
    }
}

impl<C: ConnectionLike + Send> ConnectionLike for Bounded<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let timeout = self.timeout;
        Box::pin(within(
            timeout,
            "a Redis call",
            self.inner.req_packed_command(cmd),
        ))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let timeout = self.timeout;
        Box::pin(within(
            timeout,
            "a Redis pipeline",
            self.inner.req_packed_commands(pipeline, offset, count),
        ))
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// A connected backend connection; cloning shares it.
#[derive(Clone)]
pub(crate) enum Conn {
    Standard(Bounded<ConnectionManager>),
    Cluster(Bounded<ClusterConnection>),
    Sentinel(Arc<SentinelConn>),
}

/// How a store runs its scripts, shared by its clones. In
/// [`ScriptMode::Auto`](crate::ScriptMode::Auto), Functions give way to
/// EVALSHA for good the first time the server refuses FCALL.
#[derive(Debug, Clone)]
pub(crate) struct Invoker {
    functions: Arc<AtomicBool>,
    may_fall_back: bool,
}

impl Invoker {
    /// `how`, and whether a refused FCALL may switch it to EVALSHA.
    pub(crate) fn new(how: Invoke, may_fall_back: bool) -> Self {
        Invoker {
            functions: Arc::new(AtomicBool::new(how == Invoke::Functions)),
            may_fall_back,
        }
    }

    fn current(&self) -> Invoke {
        if self.functions.load(Ordering::Relaxed) {
            Invoke::Functions
        } else {
            Invoke::Eval
        }
    }

    /// Switches to EVALSHA; true for the caller that switched.
    fn fall_back(&self) -> bool {
        self.functions
            .compare_exchange(true, false, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// The conversation whose keys the Functions probe reads: any id would do
/// (the call is read-only); this one is under the store's prefix like every
/// other, so an ACL limited to the prefix allows it.
const PROBE_ID: &str = "ticketlock:probe";

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
                let conn = within(
                    timeout,
                    "connecting",
                    client.get_connection_manager_with_config(config),
                )
                .await?;
                Ok(Conn::Standard(Bounded::new(conn, timeout)))
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
                match within(
                    timeout,
                    "connecting to the cluster",
                    client.get_async_connection(),
                )
                .await
                {
                    Ok(conn) => Ok(Conn::Cluster(Bounded::new(conn, timeout))),
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
                watchers,
            } => Ok(Conn::Sentinel(
                SentinelConn::connect(
                    Resolver {
                        client,
                        service,
                        sentinels,
                        last: None,
                    },
                    watchers,
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

    /// Runs `script` (see [`Script::run`]) the way `invoke` says; a refused
    /// FCALL in `Auto` mode switches the store to EVALSHA (logged once) and
    /// is repeated that way: the server did not run it.
    pub(crate) async fn run(&self, call: Call<'_>, invoke: &Invoker) -> RedisResult<Value> {
        let how = invoke.current();
        match self.run_as(call, how).await {
            Err(e)
                if how == Invoke::Functions
                    && invoke.may_fall_back
                    && classify(&e) == Class::Refused =>
            {
                if invoke.fall_back() {
                    tracing::warn!(
                        key = ?call.keys.first(),
                        error = %e,
                        "the server refused FCALL; running the scripts with EVALSHA from now on"
                    );
                }
                self.run_as(call, Invoke::Eval).await
            }
            result => result,
        }
    }

    async fn run_as(&self, call: Call<'_>, invoke: Invoke) -> RedisResult<Value> {
        let channels = self.channels();
        match self {
            Conn::Standard(c) => call.run(&mut c.clone(), invoke, channels).await,
            Conn::Cluster(c) => call.run(&mut c.clone(), invoke, channels).await,
            // Boxed as a trait object: the store's futures nest deep enough
            // as they are, and the compiler's auto-trait checks stop here.
            Conn::Sentinel(s) => {
                let run: std::pin::Pin<
                    Box<dyn std::future::Future<Output = RedisResult<Value>> + Send + '_>,
                > = Box::pin(s.run(call, invoke));
                run.await
            }
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

    /// What `Auto` runs the scripts with: Functions if the library loads
    /// and a read-only function of it answers both `FCALL_RO` and `FCALL`
    /// (what a store in Functions mode sends), else EVALSHA. Only a refusal
    /// counts against Functions: a call that ran and failed still ran.
    pub(crate) async fn functions_usable(&self, keys: &KeySpace) -> RedisResult<Invoke> {
        let prefix_keys = [keys.key(PROBE_ID)];
        match self.load_library().await {
            Ok(_) => {}
            // Redis < 7 (unknown command), an ACL without FUNCTION (NOPERM),
            // a server out of memory (OOM): any answer that refuses it. The
            // same code still runs by EVALSHA.
            Err(e) if !matches!(classify(&e), Class::Unanswered | Class::Tls) => {
                tracing::debug!(error = %e, "FUNCTION LOAD refused; the scripts run with EVALSHA");
                return Ok(Invoke::Eval);
            }
            Err(e) => return Err(e),
        }
        for read_only in [true, false] {
            let probe = match self {
                Conn::Standard(c) => {
                    scripts::probe(&mut c.clone(), self.channels(), read_only, &prefix_keys).await
                }
                Conn::Cluster(c) => {
                    scripts::probe(&mut c.clone(), self.channels(), read_only, &prefix_keys).await
                }
                Conn::Sentinel(s) => {
                    scripts::probe(&mut s.master(), self.channels(), read_only, &prefix_keys).await
                }
            };
            match probe {
                Err(e) if classify(&e) == Class::Refused => {
                    tracing::debug!(error = %e, "FCALL refused; the scripts run with EVALSHA");
                    return Ok(Invoke::Eval);
                }
                Err(e) if !is_server_reply(&e) => return Err(e),
                _ => {}
            }
        }
        Ok(Invoke::Functions)
    }

    pub(crate) async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        match self {
            Conn::Standard(c) => {
                within(c.timeout, "SUBSCRIBE", c.inner.clone().subscribe(channel)).await
            }
            Conn::Cluster(c) => {
                within(c.timeout, "SSUBSCRIBE", c.inner.clone().ssubscribe(channel)).await
            }
            Conn::Sentinel(s) => s.subscribe(channel).await,
        }
    }

    pub(crate) async fn unsubscribe(&self, channel: &str) -> RedisResult<()> {
        match self {
            Conn::Standard(c) => {
                let mut pubsub = c.inner.clone();
                within(c.timeout, "UNSUBSCRIBE", pubsub.unsubscribe(channel)).await
            }
            Conn::Cluster(c) => {
                let mut pubsub = c.inner.clone();
                within(c.timeout, "SUNSUBSCRIBE", pubsub.sunsubscribe(channel)).await
            }
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
/// disconnection. One attempt per (re)connect: the next call tries again
/// anyway, and retrying inside one socket timeout would only turn the real
/// cause (a refused certificate, a wrong password) into a timeout.
pub(super) fn manager_config(
    timeout: Duration,
    notifier: Arc<Notifier>,
    lost: Option<Arc<Notify>>,
) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(0)
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
pub(super) async fn within<T>(
    limit: Duration,
    what: &str,
    future: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} timed out after {limit:?}"),
        ))),
    }
}
