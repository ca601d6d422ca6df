//! Store configuration: Rasa's `endpoints.yml` `lock_store:` keys, and URLs
//! (the forms are listed at [`DeploymentMode`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::cluster::ClusterClientBuilder;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion,
    TlsCertificates, TlsMode,
};
use serde::Deserialize;

use crate::backend::connection::Connector;
use crate::error::LockError;
use crate::validate;

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
/// User, password, database and TLS (`use_ssl`, `rediss`, and the
/// `ssl_ca_certs` / `ssl_certfile` / `ssl_keyfile` files) always concern the
/// data nodes, the servers holding the locks; sentinels are asked in plain
/// text without credentials. A port left out is 6379 (26379 for a sentinel).
/// A cluster URL needs only some of the nodes (the client learns the rest).
/// A URL without a database number means database 0 (a config's `db`
/// overrides it). `#insecure` at the end of a `rediss+...` URL skips
/// certificate checks, as it does for `rediss://`. A config whose `host` is a plain `redis://` URL and whose
/// `deployment_mode` is `cluster` or `sentinel` takes that URL's
/// credentials, database and TLS for the data nodes, and its address when
/// `endpoints` is empty.
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
    /// Functions where the server supports and permits them, else `Eval`.
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
/// // Secrets never show up in Debug output.
/// assert!(!format!("{config:?}").contains("s3cret"));
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
///     "sentinel_service": "mymaster", "password": "s3cret"}"#).unwrap();
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
    /// ACL user name (of the data nodes).
    pub username: Option<String>,
    /// Password of the data nodes (never shown by `Debug` or in errors).
    pub password: Option<String>,
    /// Connect to the data nodes with TLS.
    pub use_ssl: bool,
    /// Alphanumeric prefix; keys become `<key_prefix>:lock:...` instead of `lock:...`.
    pub key_prefix: Option<String>,
    /// Seconds bounding every Redis call (default 10).
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
        f.debug_struct("StoreConfig")
            .field("store_type", &self.store_type)
            .field("host", &self.host.as_deref().map(redact_url))
            .field("port", &self.port)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("use_ssl", &self.use_ssl)
            .field("key_prefix", &self.key_prefix)
            .field("socket_timeout", &self.socket_timeout)
            .field("script_mode", &self.script_mode)
            .field("deployment_mode", &self.deployment_mode)
            .field("endpoints", &self.endpoints)
            .field("sentinel_service", &self.sentinel_service)
            .field("ssl_ca_certs", &self.ssl_ca_certs)
            .field("ssl_certfile", &self.ssl_certfile)
            .field("ssl_keyfile", &self.ssl_keyfile)
            .finish()
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
}

/// Everything needed to build a Redis backend, checked.
pub(crate) struct RedisTarget {
    /// How to reach the data nodes.
    pub(crate) client: Connector,
    pub(crate) key_prefix: String,
    pub(crate) socket_timeout: Duration,
    pub(crate) tls: bool,
    pub(crate) script_mode: ScriptMode,
}

/// `user:password@` in a URL becomes `user:<redacted>@`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((auth, host)) => {
            let user = auth.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:<redacted>@{host}")
        }
        None => url.to_owned(),
    }
}

const URL_FORMS: &str = "expected redis://[user:password@]host[:port][/db], rediss://..., \
     redis+cluster://[user:password@]host:port,host:port[/0], \
     redis+sentinel://[user:password@]host:port,host:port/<service>[/db] (rediss+ for TLS) or memory://";

fn bad_url(url: &str, why: &str) -> LockError {
    LockError::invalid("url", format!("{}: {why} ({URL_FORMS})", redact_url(url)))
}

pub(crate) fn is_memory_url(url: &str) -> bool {
    matches!(
        url.trim(),
        "memory" | "memory://" | "in_memory" | "in_memory://"
    )
}

/// Where the data lives, before credentials, certificates and connecting.
enum Shape {
    Standard(ConnectionInfo),
    Cluster(Vec<ConnectionInfo>),
    /// `data` holds what the master's connection needs: user, password, db
    /// and whether (and how) to speak TLS; its address is not used.
    Sentinel {
        sentinels: Vec<ConnectionAddr>,
        service: Option<String>,
        data: ConnectionInfo,
    },
}

impl Shape {
    fn mode(&self) -> DeploymentMode {
        match self {
            Shape::Standard(_) => DeploymentMode::Standard,
            Shape::Cluster(_) => DeploymentMode::Cluster,
            Shape::Sentinel { .. } => DeploymentMode::Sentinel,
        }
    }

    /// The data nodes' connection settings (one per startup node in a cluster).
    fn data_nodes(&mut self) -> Vec<&mut ConnectionInfo> {
        match self {
            Shape::Standard(info) => vec![info],
            Shape::Cluster(nodes) => nodes.iter_mut().collect(),
            Shape::Sentinel { data, .. } => vec![data],
        }
    }

    fn tls(&self) -> bool {
        match self {
            Shape::Standard(info) | Shape::Sentinel { data: info, .. } => tls_mode(info).is_some(),
            Shape::Cluster(nodes) => nodes.iter().any(|n| tls_mode(n).is_some()),
        }
    }
}

fn tls_mode(info: &ConnectionInfo) -> Option<TlsMode> {
    match info.addr() {
        ConnectionAddr::TcpTls { insecure: true, .. } => Some(TlsMode::Insecure),
        ConnectionAddr::TcpTls { .. } => Some(TlsMode::Secure),
        _ => None,
    }
}

/// A URL of any supported form (RESP3 is switched on here: wake-ups need it).
pub(crate) fn target_from_url(
    url: &str,
    key_prefix: Option<&str>,
    socket_timeout: Option<f64>,
) -> Result<RedisTarget, LockError> {
    let shape = shape_from_url(url.trim())?;
    if let Shape::Sentinel { service: None, .. } = shape {
        return Err(bad_url(url, "no master name after the sentinels"));
    }
    target(shape, None, key_prefix, socket_timeout)
}

fn shape_from_url(url: &str) -> Result<Shape, LockError> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (base, mode) = match scheme {
        "redis" | "rediss" => (scheme, DeploymentMode::Standard),
        "redis+cluster" | "rediss+cluster" => {
            (&scheme[..scheme.len() - 8], DeploymentMode::Cluster)
        }
        "redis+sentinel" | "rediss+sentinel" => {
            (&scheme[..scheme.len() - 9], DeploymentMode::Sentinel)
        }
        _ => return Err(bad_url(url, "unsupported scheme")),
    };
    if mode == DeploymentMode::Standard {
        return Ok(Shape::Standard(node_info(url, url)?));
    }
    // Several hosts: redis-rs parses one, so each node gets a URL of its own.
    // The credentials end at the last `@` (as in `redact_url`), so nothing of
    // a password can end up among the hosts, which errors show.
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((rest, fragment)) => (rest, format!("#{fragment}")),
        None => (rest, String::new()),
    };
    if rest.contains('?') {
        return Err(bad_url(url, "query parameters are not supported here"));
    }
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let default_port = match mode {
        DeploymentMode::Sentinel => DEFAULT_SENTINEL_PORT,
        _ => DEFAULT_PORT,
    };
    let hosts = hosts
        .split(',')
        .map(|h| endpoint(h, default_port).map_err(|why| bad_url(url, &why)))
        .collect::<Result<Vec<_>, _>>()?;
    let node =
        |host: &str, db: &str| node_info(&format!("{base}://{auth}{host}/{db}{fragment}"), url);
    match mode {
        DeploymentMode::Cluster => {
            if !matches!(path, "" | "0") {
                return Err(bad_url(url, "a Redis Cluster has database 0 only"));
            }
            let nodes = hosts
                .iter()
                .map(|h| node(h, "0"))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Shape::Cluster(nodes))
        }
        _ => {
            let (service, db) = path.split_once('/').unwrap_or((path, ""));
            let sentinels = hosts
                .iter()
                .map(|h| Ok(node_info(&format!("redis://{h}"), url)?.addr().clone()))
                .collect::<Result<Vec<_>, LockError>>()?;
            Ok(Shape::Sentinel {
                sentinels,
                service: (!service.is_empty()).then(|| service.to_owned()),
                data: node(&hosts[0], db)?,
            })
        }
    }
}

/// One node's URL, parsed by redis-rs, with RESP3; errors name `shown`.
fn node_info(node_url: &str, shown: &str) -> Result<ConnectionInfo, LockError> {
    let info = node_url
        .into_connection_info()
        .map_err(|_| bad_url(shown, "it does not parse"))?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Ok(info.set_redis_settings(settings))
}

/// `host[:port]` or `[v6]:port` as a URL authority (`host:port`); the error is the reason.
fn endpoint(text: &str, default_port: u16) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("an empty host".to_owned());
    }
    if t.contains(['/', '@', '?', '#', ' ', ',']) {
        return Err(format!("{t:?} is not a host[:port]"));
    }
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{t:?} lacks its closing ]"))?;
        (
            format!("[{host}]"),
            after
                .strip_prefix(':')
                .or((!after.is_empty()).then_some(after)),
        )
    } else {
        match t.rsplit_once(':') {
            // A bare IPv6 address, without a port.
            Some((host, _)) if host.contains(':') => (format!("[{t}]"), None),
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (t.to_owned(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("{t:?} does not end in a usable port")),
            Ok(p) => p,
        },
    };
    Ok(format!("{host}:{port}"))
}

/// The Redis target a `type: redis` configuration describes.
pub(crate) fn target_from_config(config: &StoreConfig) -> Result<RedisTarget, LockError> {
    let shape = shape_from_config(config)?;
    let certs = certificates(config, shape.tls())?;
    let mut target = target(
        shape,
        certs,
        config.key_prefix.as_deref(),
        config.socket_timeout,
    )?;
    target.script_mode = config.script_mode;
    Ok(target)
}

fn shape_from_config(config: &StoreConfig) -> Result<Shape, LockError> {
    let host = config.host.as_deref().unwrap_or("localhost").trim();
    let mode = config.deployment_mode;
    // Credentials, when a URL carries its own, apply only when the config sets some.
    let mut always = config.db.is_some() || config.username.is_some() || config.password.is_some();
    let mut shape = if host.contains("://") {
        let shape = shape_from_url(host)?;
        match (mode, shape) {
            // The URL says it all (a standard config may carry any URL).
            (DeploymentMode::Standard, shape) => {
                no_endpoints(config, shape.mode())?;
                shape
            }
            (mode, shape) if mode == shape.mode() => {
                no_endpoints(config, mode)?;
                shape
            }
            // A plain URL for one node: the address (unless `endpoints`
            // are given), credentials, db and TLS of the deployment.
            (mode, Shape::Standard(info)) => {
                let default_port = match mode {
                    DeploymentMode::Sentinel => DEFAULT_SENTINEL_PORT,
                    _ => DEFAULT_PORT,
                };
                let mut hosts = Vec::new();
                for e in &config.endpoints {
                    hosts.push(
                        endpoint(e, default_port)
                            .map_err(|why| LockError::invalid("endpoints", why))?,
                    );
                }
                if hosts.is_empty() {
                    hosts.push(info.addr().to_string());
                }
                deployment(mode, &hosts, &info)?
            }
            (mode, shape) => {
                return Err(LockError::invalid(
                    "deployment mode",
                    format!(
                        "deployment_mode is {mode:?} but the url {} is for {:?}",
                        redact_url(host),
                        shape.mode()
                    ),
                ))
            }
        }
    } else {
        if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
            return Err(LockError::invalid(
                "host",
                format!("{host:?} is not a host name or address"),
            ));
        }
        if config.port == Some(0) {
            return Err(LockError::invalid("port", "0 is not a usable port"));
        }
        let scheme = if config.use_ssl { "rediss" } else { "redis" };
        let default_port = match mode {
            DeploymentMode::Sentinel => DEFAULT_SENTINEL_PORT,
            _ => DEFAULT_PORT,
        };
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let own = format!("{host}:{}", config.port.unwrap_or(default_port));
        let template = node_info(&format!("{scheme}://{own}/"), &format!("{scheme}://{own}/"))?;
        let mut hosts = Vec::new();
        for e in &config.endpoints {
            hosts.push(
                endpoint(e, default_port).map_err(|why| LockError::invalid("endpoints", why))?,
            );
        }
        if mode == DeploymentMode::Standard {
            no_endpoints(config, mode)?;
        }
        if hosts.is_empty() {
            hosts.push(own);
        }
        // A host without a URL gets Rasa's defaults (db 1) even without credentials.
        always = true;
        deployment(mode, &hosts, &template)?
    };
    if let Shape::Sentinel { service, .. } = &mut shape {
        if let Some(name) = &config.sentinel_service {
            *service = Some(name.clone());
        }
        if service.as_deref().is_none_or(str::is_empty) {
            return Err(LockError::invalid(
                "sentinel_service",
                "a sentinel deployment needs the master's name (sentinel_service, or the url's path)",
            ));
        }
    }
    with_credentials(shape, config, always)
}

fn no_endpoints(config: &StoreConfig, mode: DeploymentMode) -> Result<(), LockError> {
    if config.endpoints.is_empty() {
        return Ok(());
    }
    Err(LockError::invalid(
        "endpoints",
        match mode {
            DeploymentMode::Standard => {
                "endpoints are for deployment_mode cluster or sentinel; a standard deployment has one host".to_owned()
            }
            _ => "the url already names the nodes: give them either in the url or in endpoints".to_owned(),
        },
    ))
}

/// The deployment `mode` over `hosts` (`host:port`), each data node
/// connecting like `template` (scheme, credentials, db).
fn deployment(
    mode: DeploymentMode,
    hosts: &[String],
    template: &ConnectionInfo,
) -> Result<Shape, LockError> {
    let with_addr = |host: &str| -> Result<ConnectionInfo, LockError> {
        let scheme = if tls_mode(template).is_some() {
            "rediss"
        } else {
            "redis"
        };
        let addr = node_info(
            &format!("{scheme}://{host}/"),
            &format!("{scheme}://{host}/"),
        )?;
        let mut addr = addr.addr().clone();
        if let (ConnectionAddr::TcpTls { insecure, .. }, Some(TlsMode::Insecure)) =
            (&mut addr, tls_mode(template))
        {
            *insecure = true;
        }
        Ok(template.clone().set_addr(addr))
    };
    Ok(match mode {
        DeploymentMode::Standard => Shape::Standard(with_addr(&hosts[0])?),
        DeploymentMode::Cluster => Shape::Cluster(
            hosts
                .iter()
                .map(|h| with_addr(h))
                .collect::<Result<_, _>>()?,
        ),
        DeploymentMode::Sentinel => Shape::Sentinel {
            sentinels: hosts
                .iter()
                .map(|h| Ok(node_info(&format!("redis://{h}/"), h)?.addr().clone()))
                .collect::<Result<_, LockError>>()?,
            service: None,
            data: template.clone(),
        },
    })
}

/// The config's db, user and password on every data node (`always`: even
/// when none is set, which gives the default db).
fn with_credentials(
    mut shape: Shape,
    config: &StoreConfig,
    always: bool,
) -> Result<Shape, LockError> {
    let cluster = shape.mode() == DeploymentMode::Cluster;
    if cluster && config.db.is_some_and(|db| db != 0) {
        return Err(LockError::invalid(
            "db",
            format!(
                "a Redis Cluster has database 0 only, not {}",
                config.db.unwrap_or(0)
            ),
        ));
    }
    if let Some(db) = config.db {
        if db < 0 {
            return Err(LockError::invalid(
                "db",
                format!("{db} is not a database number"),
            ));
        }
    }
    if !always {
        return Ok(shape);
    }
    let default_db = if cluster { 0 } else { DEFAULT_DB };
    for info in shape.data_nodes() {
        let mut settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3)
            .set_db(config.db.unwrap_or(default_db));
        if let Some(user) = &config.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &config.password {
            settings = settings.set_password(password);
        }
        *info = info.clone().set_redis_settings(settings);
    }
    Ok(shape)
}

/// The CA and client certificate files of a config, read and checked.
fn certificates(config: &StoreConfig, tls: bool) -> Result<Option<TlsCertificates>, LockError> {
    let (ca, cert, key) = (
        &config.ssl_ca_certs,
        &config.ssl_certfile,
        &config.ssl_keyfile,
    );
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    if !tls {
        return Err(LockError::invalid(
            "tls",
            "ssl_ca_certs, ssl_certfile or ssl_keyfile is set, but TLS is off: set use_ssl: true or use a rediss:// url",
        ));
    }
    let root_cert = match ca {
        Some(path) => {
            let pem = read_pem("ssl_ca_certs", path)?;
            if !contains_certificate(&pem) {
                return Err(LockError::invalid(
                    "ssl_ca_certs",
                    format!("{} holds no PEM certificate", path.display()),
                ));
            }
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (cert, key) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(LockError::invalid(
                "ssl_keyfile",
                "ssl_keyfile is set without ssl_certfile",
            ))
        }
        (Some(cert), key) => {
            let client_cert = read_pem("ssl_certfile", cert)?;
            if !contains_certificate(&client_cert) {
                return Err(LockError::invalid(
                    "ssl_certfile",
                    format!("{} holds no PEM certificate", cert.display()),
                ));
            }
            let client_key = match key {
                Some(key) => read_pem("ssl_keyfile", key)?,
                None => client_cert.clone(),
            };
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
    };
    let certs = TlsCertificates {
        client_tls,
        root_cert,
    };
    // Parse them now (redis-rs does so when a client is built), so a bad file
    // is an error of the configuration rather than of every connection.
    redis::Client::build_with_tls("rediss://127.0.0.1/", certs.clone())
        .map_err(|e| LockError::invalid("tls", format!("the TLS files do not load: {e}")))?;
    Ok(Some(certs))
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, LockError> {
    std::fs::read(path)
        .map_err(|e| LockError::invalid(what, format!("cannot read {}: {e}", path.display())))
}

fn contains_certificate(pem: &[u8]) -> bool {
    pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----")
}

fn target(
    shape: Shape,
    certs: Option<TlsCertificates>,
    key_prefix: Option<&str>,
    socket_timeout: Option<f64>,
) -> Result<RedisTarget, LockError> {
    let key_prefix = match key_prefix {
        None => validate::DEFAULT_KEY_PREFIX.to_owned(),
        Some(p) => validate::key_prefix(p)?,
    };
    let socket_timeout = match socket_timeout {
        None => DEFAULT_SOCKET_TIMEOUT,
        Some(s) => validate::seconds(s, "socket timeout")?,
    };
    let tls = shape.tls();
    let invalid = |e: redis::RedisError| LockError::invalid("redis connection", e.to_string());
    let client = match shape {
        Shape::Standard(info) => Connector::Standard(match certs {
            Some(certs) => redis::Client::build_with_tls(info, certs).map_err(invalid)?,
            None => redis::Client::open(info).map_err(invalid)?,
        }),
        Shape::Cluster(nodes) => {
            if let Some(node) = nodes.iter().find(|n| n.redis_settings().db() != 0) {
                return Err(LockError::invalid(
                    "db",
                    format!(
                        "a Redis Cluster has database 0 only, not {}",
                        node.redis_settings().db()
                    ),
                ));
            }
            // Built once here for its checks (one user, password, TLS mode
            // across the nodes); the backend builds its own with a push sender.
            let mut check =
                ClusterClientBuilder::new(nodes.clone()).use_protocol(ProtocolVersion::RESP3);
            if let Some(certs) = &certs {
                check = check.certs(certs.clone());
            }
            check.build().map_err(invalid)?;
            Connector::Cluster { nodes, certs }
        }
        Shape::Sentinel {
            sentinels,
            service,
            data,
        } => {
            let service = service.unwrap_or_default();
            let shown: Vec<String> = sentinels.iter().map(ToString::to_string).collect();
            let settings = data.redis_settings();
            let mut builder =
                SentinelClientBuilder::new(sentinels, &service, SentinelServerType::Master)
                    .map_err(invalid)?
                    .set_client_to_redis_protocol(ProtocolVersion::RESP3)
                    .set_client_to_redis_db(settings.db());
            if let Some(user) = settings.username() {
                builder = builder.set_client_to_redis_username(user);
            }
            if let Some(password) = settings.password() {
                builder = builder.set_client_to_redis_password(password);
            }
            if let Some(mode) = tls_mode(&data) {
                builder = builder.set_client_to_redis_tls_mode(mode);
            }
            if let Some(certs) = certs {
                builder = builder.set_client_to_redis_certificates(certs);
            }
            Connector::Sentinel {
                client: builder.build().map_err(invalid)?,
                service,
                sentinels: shown,
            }
        }
    };
    Ok(RedisTarget {
        client,
        key_prefix,
        socket_timeout,
        tls,
        script_mode: ScriptMode::Auto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_when_shown() {
        assert_eq!(
            redact_url("redis://u:pw@h:1/2"),
            "redis://u:<redacted>@h:1/2"
        );
        assert_eq!(redact_url("redis://:pw@h"), "redis://:<redacted>@h");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn malformed_urls_are_typed_errors_without_secrets() {
        for url in [
            "http://h",
            "redis//h",
            "",
            "redis://:pw@",
            "redis://h:99999",
            "redis://u:s3cret@h:notaport",
        ] {
            match target_from_url(url, None, None) {
                Err(LockError::InvalidInput { reason, .. }) => {
                    assert!(!reason.contains("s3cret"), "{reason}")
                }
                Err(other) => panic!("{url}: unexpected {other}"),
                Ok(_) => panic!("{url}: accepted"),
            }
        }
    }

    /// The standard client's address and settings.
    fn standard(t: &RedisTarget) -> &ConnectionInfo {
        match &t.client {
            Connector::Standard(client) => client.get_connection_info(),
            _ => panic!("not a standard deployment"),
        }
    }

    fn cluster_nodes(t: &RedisTarget) -> Vec<String> {
        match &t.client {
            Connector::Cluster { nodes, .. } => {
                nodes.iter().map(|n| n.addr().to_string()).collect()
            }
            _ => panic!("not a cluster deployment"),
        }
    }

    fn sentinel(t: &RedisTarget) -> (&[String], &str) {
        match &t.client {
            Connector::Sentinel {
                sentinels, service, ..
            } => (sentinels, service),
            _ => panic!("not a sentinel deployment"),
        }
    }

    #[test]
    fn configs_follow_rasa_defaults() {
        let t = target_from_config(&StoreConfig::redis("10.1.2.3")).unwrap();
        let info = standard(&t);
        assert_eq!(info.addr().to_string(), "10.1.2.3:6379");
        assert_eq!(info.redis_settings().db(), DEFAULT_DB);
        assert_eq!(t.key_prefix, "lock:");
        let mut c = StoreConfig::redis("h");
        c.key_prefix = Some("bot-1".into());
        assert!(target_from_config(&c).is_err());
        c.key_prefix = Some("bot1".into());
        c.socket_timeout = Some(f64::NAN);
        assert!(target_from_config(&c).is_err());
    }

    #[test]
    fn deployment_modes_deserialize_in_snake_case() {
        let c: StoreConfig = serde_json::from_str(
            r#"{"type": "redis", "deployment_mode": "sentinel", "endpoints": ["a:1", "b"],
                "sentinel_service": "mymaster", "ssl_ca_certs": "/ca.pem",
                "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}"#,
        )
        .unwrap();
        assert_eq!(c.deployment_mode, DeploymentMode::Sentinel);
        assert_eq!(c.endpoints, ["a:1", "b"]);
        assert_eq!(c.ssl_keyfile.as_deref(), Some(Path::new("/k.pem")));
        let c: StoreConfig = serde_json::from_str(r#"{"deployment_mode": "cluster"}"#).unwrap();
        assert_eq!(c.deployment_mode, DeploymentMode::Cluster);
        assert_eq!(
            serde_json::from_str::<StoreConfig>("{}")
                .unwrap()
                .deployment_mode,
            DeploymentMode::Standard
        );
        assert!(serde_json::from_str::<StoreConfig>(r#"{"deployment_mode": "ring"}"#).is_err());
    }

    #[test]
    fn cluster_urls_and_configs_name_every_startup_node() {
        let t = target_from_url(
            "redis+cluster://u:s3cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            cluster_nodes(&t),
            ["10.0.0.1:7000", "10.0.0.2:7001", "::1:7002"]
        );
        assert!(!t.tls);
        if let Connector::Cluster { nodes, .. } = &t.client {
            for n in nodes {
                assert_eq!(n.redis_settings().username(), Some("u"));
                assert_eq!(n.redis_settings().password(), Some("s3cret"));
                assert_eq!(n.redis_settings().db(), 0);
                assert_eq!(n.redis_settings().protocol(), ProtocolVersion::RESP3);
            }
        }
        let t = target_from_url("rediss+cluster://h1,h2:7001/0", None, None).unwrap();
        assert_eq!(cluster_nodes(&t), ["h1:6379", "h2:7001"]);
        assert!(t.tls);
        let t = target_from_url("rediss+cluster://h1,h2#insecure", None, None).unwrap();
        if let Connector::Cluster { nodes, .. } = &t.client {
            assert!(nodes.iter().all(|n| tls_mode(n) == Some(TlsMode::Insecure)));
        }

        let mut c = StoreConfig::redis("ignored");
        c.deployment_mode = DeploymentMode::Cluster;
        c.endpoints = vec!["n1:7000".into(), " n2:7001 ".into()];
        c.password = Some("pw".into());
        let t = target_from_config(&c).unwrap();
        assert_eq!(cluster_nodes(&t), ["n1:7000", "n2:7001"]);
        // Without endpoints: host and port.
        let mut c = StoreConfig::redis("n3");
        c.deployment_mode = DeploymentMode::Cluster;
        c.port = Some(7005);
        assert_eq!(cluster_nodes(&target_from_config(&c).unwrap()), ["n3:7005"]);
        // A plain URL as host gives the node (and its credentials).
        let mut c = StoreConfig::redis("redis://:pw@n4:7006");
        c.deployment_mode = DeploymentMode::Cluster;
        assert_eq!(cluster_nodes(&target_from_config(&c).unwrap()), ["n4:7006"]);
        // The cluster URL in a standard config decides by itself.
        let c = StoreConfig::redis("redis+cluster://n5:1,n6:2");
        assert_eq!(
            cluster_nodes(&target_from_config(&c).unwrap()),
            ["n5:1", "n6:2"]
        );
    }

    #[test]
    fn sentinel_urls_and_configs_name_the_sentinels_and_the_service() {
        let t = target_from_url(
            "redis+sentinel://:s3cret@s1:26380,s2/mymaster/3",
            None,
            None,
        )
        .unwrap();
        let (sentinels, service) = sentinel(&t);
        assert_eq!(service, "mymaster");
        assert_eq!(sentinels, ["s1:26380", "s2:26379"]);
        assert!(!t.tls);
        assert!(
            target_from_url("rediss+sentinel://s1/mymaster", None, None)
                .unwrap()
                .tls
        );

        let mut c = StoreConfig::redis("localhost");
        c.deployment_mode = DeploymentMode::Sentinel;
        c.endpoints = vec!["s1:1".into(), "s2:2".into()];
        assert!(matches!(
            target_from_config(&c),
            Err(LockError::InvalidInput {
                what: "sentinel_service",
                ..
            })
        ));
        c.sentinel_service = Some("svc".into());
        assert_eq!(sentinel(&target_from_config(&c).unwrap()).1, "svc");
        let mut c = StoreConfig::redis("redis+sentinel://s1:1/a");
        c.sentinel_service = Some("b".into());
        assert_eq!(sentinel(&target_from_config(&c).unwrap()).1, "b");
    }

    #[test]
    fn malformed_deployments_are_typed_errors_without_secrets() {
        for url in [
            "redis+cluster://",
            "redis+cluster://a:1,,b:2",
            "redis+cluster://u:s3cret@a:1,b:notaport",
            "redis+cluster://a:1/3",
            "redis+cluster://a:1?protocol=2",
            "redis+sentinel://s1:1",
            "redis+sentinel://s1:1/",
            "redis+sentinel://u:s3cret@s1:0/m",
            "redis+cluster://u:s3/cret@a:x",
            "redis+cluster://u:s3,cret@a:1,:2",
            "redis+sentinel://u:s3cret#x@s1:1/m/notadb",
            "redis+ring://a:1",
        ] {
            match target_from_url(url, None, None) {
                Err(LockError::InvalidInput { reason, .. }) => {
                    for part in ["s3cret", "cret", "s3/", "s3,"] {
                        assert!(!reason.contains(part), "{url}: {reason}")
                    }
                }
                Err(other) => panic!("{url}: unexpected {other}"),
                Ok(_) => panic!("{url}: accepted"),
            }
        }
        let mut c = StoreConfig::redis("h");
        c.deployment_mode = DeploymentMode::Cluster;
        c.db = Some(1);
        assert!(matches!(
            target_from_config(&c),
            Err(LockError::InvalidInput { what: "db", .. })
        ));
        let mut c = StoreConfig::redis("h");
        c.endpoints = vec!["a:1".into()];
        assert!(matches!(
            target_from_config(&c),
            Err(LockError::InvalidInput {
                what: "endpoints",
                ..
            })
        ));
        let mut c = StoreConfig::redis("redis+cluster://a:1");
        c.deployment_mode = DeploymentMode::Sentinel;
        assert!(target_from_config(&c).is_err());
        let mut c = StoreConfig::redis("h");
        c.deployment_mode = DeploymentMode::Cluster;
        c.endpoints = vec!["a b".into()];
        assert!(matches!(
            target_from_config(&c),
            Err(LockError::InvalidInput {
                what: "endpoints",
                ..
            })
        ));
    }

    #[test]
    fn tls_files_need_tls_and_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("ticketlock-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let mut c = StoreConfig::redis("h");
        c.ssl_ca_certs = Some(not_pem.clone());
        assert!(matches!(
            target_from_config(&c),
            Err(LockError::InvalidInput { what: "tls", .. })
        ));
        c.use_ssl = true;
        assert!(matches!(
            target_from_config(&c),
            Err(LockError::InvalidInput {
                what: "ssl_ca_certs",
                ..
            })
        ));
        c.ssl_ca_certs = Some(dir.join("missing.pem"));
        match target_from_config(&c) {
            Err(LockError::InvalidInput {
                what: "ssl_ca_certs",
                reason,
            }) => {
                assert!(reason.contains("missing.pem"), "{reason}")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        c.ssl_ca_certs = None;
        c.ssl_keyfile = Some(not_pem.clone());
        assert!(matches!(
            target_from_config(&c),
            Err(LockError::InvalidInput {
                what: "ssl_keyfile",
                ..
            })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn endpoints_take_hosts_ports_and_ipv6() {
        assert_eq!(endpoint("h", 26379).unwrap(), "h:26379");
        assert_eq!(endpoint(" h:1 ", 6379).unwrap(), "h:1");
        assert_eq!(endpoint("[::1]:7000", 6379).unwrap(), "[::1]:7000");
        assert_eq!(endpoint("[::1]", 6379).unwrap(), "[::1]:6379");
        assert_eq!(endpoint("::1", 6379).unwrap(), "[::1]:6379");
        for bad in ["", "h:0", "h:x", "h:70000", "[::1", "a/b", "u@h", "h:1,h:2"] {
            assert!(endpoint(bad, 6379).is_err(), "{bad} accepted");
        }
    }
}
