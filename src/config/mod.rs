//! Store configuration: Rasa's `endpoints.yml` `lock_store:` keys, and URLs
//! (the forms are listed at [`DeploymentMode`]).
//!
//! Three steps, each in one place: the public types (here); the URL grammar
//! ([`StoreConfig::from_url`], in `url.rs`), which only turns a URL into
//! these fields; and `resolve.rs`, which turns a configuration into the
//! [`Deployment`] a backend connects to and checks every rule once. Building
//! redis-rs clients from a `Deployment` is the Redis backend's business
//! (`backend/connect.rs`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::LockError;

mod resolve;
mod url;

pub(crate) use resolve::{resolve, Access, Deployment, Endpoint, Tls, TlsFiles, Topology};
pub(crate) use url::is_memory_url;

/// Redis port when none is configured.
pub const DEFAULT_PORT: u16 = 6379;
/// Redis database when none is configured (Rasa's default).
pub const DEFAULT_DB: i64 = 1;
/// Bound on every Redis call and on connecting, when none is configured.
pub const DEFAULT_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Sentinel port when an endpoint of a `sentinel` deployment names none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// Which backend a [`StoreConfig`] selects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreType {
    /// One process, no server ([`LockStore::in_memory`](crate::LockStore::in_memory)).
    #[default]
    #[serde(alias = "memory")]
    InMemory,
    /// Redis, shared by every process that uses the same server and prefix.
    Redis,
}

/// How the Redis servers are deployed (Rasa's `deployment_mode`), and the
/// URL and configuration forms of each:
///
/// | deployment | URL | [`StoreConfig`] |
/// | --- | --- | --- |
/// | one server | `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS) | `host`, `port` |
/// | Redis Cluster | `redis+cluster://[user:password@]h1:p1,h2:p2[/0]`, `rediss+cluster://...` | `deployment_mode: cluster`, `endpoints: ["h1:p1", "h2:p2"]` |
/// | Sentinel | `redis+sentinel://[user:password@]s1:p1,s2:p2/<service>[/db]`, `rediss+sentinel://...` | `deployment_mode: sentinel`, `endpoints` (the sentinels), `sentinel_service` |
///
/// User, password, database and TLS (`use_ssl`, `rediss`) concern the data
/// nodes, the servers holding the locks. Sentinels are asked with their own
/// `sentinel_username`, `sentinel_password` and `sentinel_use_ssl`
/// (configuration fields only: a URL has one user-info part, and it belongs
/// to the data nodes); the TLS files `ssl_ca_certs` / `ssl_certfile` /
/// `ssl_keyfile` serve both. A port left out is 6379 (26379 for a sentinel).
/// A cluster URL needs only some of the nodes (the client learns the rest).
/// A URL without a database number means database 0. `#insecure` at the end
/// of a `rediss...` URL skips certificate checks (only with the crate's
/// `tls-insecure` feature). A URL has no query parameters; user and password
/// may be percent-encoded, and everything up to the last `@` is taken as
/// user and password.
///
/// A config's `host` may itself be a URL. The fields the config sets then
/// override the URL's (user, password, db, TLS, `sentinel_service`), but for
/// `port`, which only fills in a port the URL left out. With
/// `deployment_mode` `cluster` or `sentinel`, a plain `redis://` URL gives
/// the credentials, database and TLS of the data nodes, and the address of
/// the node (or sentinel) when `endpoints` is empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeploymentMode {
    /// One server (`host`, `port`), replicas or not.
    #[default]
    Standard,
    /// A Redis Cluster, found through its startup nodes (`endpoints`). Every
    /// conversation lives on one shard (its keys share a hash tag), and its
    /// wake-ups use sharded pub/sub (`SSUBSCRIBE` / `SPUBLISH`) on that shard.
    /// Database 0 only.
    Cluster,
    /// The master that Redis Sentinels (`endpoints`) name for
    /// `sentinel_service`. After a failover the store finds the new master by
    /// itself: calls in flight fail with a retryable error, and the same store
    /// keeps serving.
    Sentinel,
}

/// How the Redis backend runs the Lua scripts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScriptMode {
    /// `EVALSHA`, loading scripts with `SCRIPT LOAD` when the server lacks them.
    Eval,
    /// The `ticketlock_v1` Functions library (`FCALL`), loaded at connect and
    /// reloaded when the server lost it; creating the store fails where
    /// Functions are unsupported (Redis < 7) or not permitted.
    Functions,
    /// Functions where the server runs them, else `Eval`. At connect the
    /// store loads the library and calls a read-only function of it with
    /// `FCALL` and `FCALL_RO` (on a key under its prefix, so an ACL limited
    /// to the prefix allows it); if either is refused (Redis < 7, an ACL
    /// without them, `rename-command`), it uses `EVALSHA`. If `FCALL` is
    /// refused later (the ACL changed), it switches to `EVALSHA` once, logs a
    /// warning, and repeats the refused call.
    #[default]
    Auto,
}

/// The `lock_store:` section of Rasa's `endpoints.yml`, deserialisable with serde.
///
/// ```
/// let yaml_as_json = r#"{"type": "redis", "host": "10.0.0.5", "port": 6380,
///                        "password": "s3cret", "key_prefix": "bot1"}"#;
/// let config: ticketlock::StoreConfig = serde_json::from_str(yaml_as_json).unwrap();
/// assert_eq!(config.port, Some(6380));
/// // Secrets never show up in Debug or Display output.
/// assert!(!format!("{config:?}").contains("s3cret"));
/// assert_eq!(config.to_string(), "redis://<redacted>@10.0.0.5:6380/1");
/// ```
///
/// A Redis Cluster, and the master of a Sentinel deployment, over TLS with a
/// private CA:
///
/// ```
/// use ticketlock::{DeploymentMode, StoreConfig};
/// let cluster: StoreConfig = serde_json::from_str(r#"{"type": "redis",
///     "deployment_mode": "cluster", "endpoints": ["10.0.0.1:7000", "10.0.0.2:7000"],
///     "use_ssl": true, "ssl_ca_certs": "/etc/redis/ca.pem"}"#).unwrap();
/// assert_eq!(cluster.deployment_mode, DeploymentMode::Cluster);
///
/// let sentinel: StoreConfig = serde_json::from_str(r#"{"type": "redis",
///     "deployment_mode": "sentinel", "endpoints": ["10.0.0.1:26379", "10.0.0.2:26379"],
///     "sentinel_service": "mymaster", "password": "s3cret",
///     "sentinel_password": "s3ntinel", "sentinel_use_ssl": true}"#).unwrap();
/// assert_eq!(sentinel.sentinel_service.as_deref(), Some("mymaster"));
/// ```
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct StoreConfig {
    /// `in_memory` (default) or `redis`.
    #[serde(rename = "type")]
    pub store_type: StoreType,
    /// Redis host name or address; a full URL is accepted too (key `url` is an
    /// alias): `redis://`, `rediss://`, `redis+cluster://`, `redis+sentinel://`
    /// (see [`DeploymentMode`]).
    #[serde(alias = "url")]
    pub host: Option<String>,
    /// Redis port (default [`DEFAULT_PORT`]).
    pub port: Option<u16>,
    /// Redis database number (default [`DEFAULT_DB`]; a cluster has only 0,
    /// which is its default).
    pub db: Option<i64>,
    /// ACL user name (of the data nodes; never shown by `Debug`, `Display` or in errors).
    pub username: Option<String>,
    /// Password of the data nodes (never shown by `Debug`, `Display` or in errors).
    pub password: Option<String>,
    /// Connect to the data nodes with TLS.
    pub use_ssl: bool,
    /// Skip the certificate checks of TLS connections (`#insecure` in a
    /// URL). Needs the crate's `tls-insecure` feature; without it, a
    /// configuration asking for it is refused.
    pub ssl_insecure: bool,
    /// Alphanumeric prefix; keys become `<key_prefix>:lock:...` instead of `lock:...`.
    pub key_prefix: Option<String>,
    /// Seconds bounding connecting (TLS handshake included) and every Redis
    /// call (default 10).
    pub socket_timeout: Option<f64>,
    /// How the scripts run (default [`ScriptMode::Auto`]).
    pub script_mode: ScriptMode,
    /// `standard` (default), `cluster` or `sentinel`.
    pub deployment_mode: DeploymentMode,
    /// `"host:port"` entries: a cluster's startup nodes, or the sentinels
    /// (port [`DEFAULT_SENTINEL_PORT`] when left out). Empty: `host` and `port`.
    pub endpoints: Vec<String>,
    /// The master name the sentinels know (`sentinel` mode; required there).
    pub sentinel_service: Option<String>,
    /// ACL user name on the sentinels (`sentinel` mode; never shown).
    pub sentinel_username: Option<String>,
    /// Password of the sentinels, for sentinels with `requirepass` or ACL
    /// users (`sentinel` mode; never shown).
    pub sentinel_password: Option<String>,
    /// Ask the sentinels over TLS (`sentinel` mode), with the same
    /// `ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` as the data nodes.
    pub sentinel_use_ssl: bool,
    /// PEM file of the certificate authorities to trust (TLS), instead of
    /// the system's.
    pub ssl_ca_certs: Option<PathBuf>,
    /// PEM client certificate (chain), for servers that verify clients
    /// (`tls-auth-clients yes`).
    pub ssl_certfile: Option<PathBuf>,
    /// PEM private key of `ssl_certfile` (default: read from `ssl_certfile`).
    pub ssl_keyfile: Option<PathBuf>,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |secret: &Option<String>| secret.as_ref().map(|_| url::REDACTED);
        f.debug_struct("StoreConfig")
            .field("store_type", &self.store_type)
            .field("host", &self.host.as_deref().map(url::shown_host))
            .field("port", &self.port)
            .field("db", &self.db)
            .field("username", &hidden(&self.username))
            .field("password", &hidden(&self.password))
            .field("use_ssl", &self.use_ssl)
            .field("ssl_insecure", &self.ssl_insecure)
            .field("key_prefix", &self.key_prefix)
            .field("socket_timeout", &self.socket_timeout)
            .field("script_mode", &self.script_mode)
            .field("deployment_mode", &self.deployment_mode)
            .field(
                "endpoints",
                &self
                    .endpoints
                    .iter()
                    .map(|e| url::shown_host(e))
                    .collect::<Vec<_>>(),
            )
            .field("sentinel_service", &self.sentinel_service)
            .field("sentinel_username", &hidden(&self.sentinel_username))
            .field("sentinel_password", &hidden(&self.sentinel_password))
            .field("sentinel_use_ssl", &self.sentinel_use_ssl)
            .field("ssl_ca_certs", &self.ssl_ca_certs)
            .field("ssl_certfile", &self.ssl_certfile)
            .field("ssl_keyfile", &self.ssl_keyfile)
            .finish()
    }
}

/// The URL the configuration describes, with user and password replaced by
/// `<redacted>`: what messages and the command line show of a store.
/// `memory://` in memory; `<invalid configuration>` when it does not
/// [resolve](StoreConfig::from_url) (nothing of it is shown then).
///
/// ```
/// let config = ticketlock::StoreConfig::from_url("rediss://app:s3cret@10.0.0.5/2")?;
/// assert_eq!(config.to_string(), "rediss://<redacted>@10.0.0.5:6379/2");
/// # Ok::<(), ticketlock::LockError>(())
/// ```
impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.store_type == StoreType::InMemory {
            return f.write_str("memory://");
        }
        match resolve(self) {
            Ok(deployment) => url::write_url(f, &deployment),
            Err(_) => f.write_str("<invalid configuration>"),
        }
    }
}

impl StoreConfig {
    /// A Redis configuration for `host` (a host name or a full URL).
    pub fn redis(host: impl Into<String>) -> Self {
        StoreConfig {
            store_type: StoreType::Redis,
            host: Some(host.into()),
            ..StoreConfig::default()
        }
    }

    /// The configuration a URL describes (the forms are listed at
    /// [`DeploymentMode`]; `memory://` is the in-memory store). Only the
    /// URL's own syntax is checked here; [`LockStore::create`](crate::LockStore::create)
    /// checks the whole configuration. Errors never show the URL's user or
    /// password, nor any part of it that did not parse.
    ///
    /// ```
    /// use ticketlock::{DeploymentMode, StoreConfig, StoreType};
    /// let config = StoreConfig::from_url("redis+sentinel://:s3cret@s1,s2:26380/mymaster/2")?;
    /// assert_eq!(config.store_type, StoreType::Redis);
    /// assert_eq!(config.deployment_mode, DeploymentMode::Sentinel);
    /// assert_eq!(config.endpoints, ["s1", "s2:26380"]);
    /// assert_eq!((config.sentinel_service.as_deref(), config.db), (Some("mymaster"), Some(2)));
    /// assert_eq!(config.password.as_deref(), Some("s3cret"));
    ///
    /// let typo = StoreConfig::from_url("redis//:s3cret@host").unwrap_err();
    /// assert!(!typo.to_string().contains("s3cret"));
    /// # Ok::<(), ticketlock::LockError>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self, LockError> {
        url::parse(url)
    }
}
