//! Store configuration: Rasa's `endpoints.yml` `lock_store:` keys, and URLs.

use std::fmt;
use std::time::Duration;

use redis::{IntoConnectionInfo, ProtocolVersion};
use serde::Deserialize;

use crate::error::LockError;
use crate::validate;

/// Redis port when none is configured.
pub const DEFAULT_PORT: u16 = 6379;
/// Redis database when none is configured (Rasa's default).
pub const DEFAULT_DB: i64 = 1;
/// Bound on every Redis call and on connecting, when none is configured.
pub const DEFAULT_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

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
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct StoreConfig {
    /// `in_memory` (default) or `redis`.
    #[serde(rename = "type")]
    pub store_type: StoreType,
    /// Redis host name or address; a full `redis://` / `rediss://` URL is accepted too (key `url` is an alias).
    #[serde(alias = "url")]
    pub host: Option<String>,
    /// Redis port (default [`DEFAULT_PORT`]).
    pub port: Option<u16>,
    /// Redis database number (default [`DEFAULT_DB`]).
    pub db: Option<i64>,
    /// ACL user name.
    pub username: Option<String>,
    /// Password (never shown by `Debug` or in errors).
    pub password: Option<String>,
    /// Connect with TLS.
    pub use_ssl: bool,
    /// Alphanumeric prefix; keys become `<key_prefix>:lock:...` instead of `lock:...`.
    pub key_prefix: Option<String>,
    /// Seconds bounding every Redis call (default 10).
    pub socket_timeout: Option<f64>,
    /// How the scripts run (default [`ScriptMode::Auto`]).
    pub script_mode: ScriptMode,
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
    pub(crate) client: redis::Client,
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

fn bad_url(url: &str, why: &str) -> LockError {
    LockError::invalid(
        "url",
        format!(
            "{}: {why} (expected redis://[user:password@]host[:port][/db], rediss://... or memory://)",
            redact_url(url)
        ),
    )
}

pub(crate) fn is_memory_url(url: &str) -> bool {
    matches!(
        url.trim(),
        "memory" | "memory://" | "in_memory" | "in_memory://"
    )
}

/// A `redis://` or `rediss://` URL (RESP3 is switched on here: wake-ups need it).
pub(crate) fn target_from_url(
    url: &str,
    key_prefix: Option<&str>,
    socket_timeout: Option<f64>,
) -> Result<RedisTarget, LockError> {
    let url = url.trim();
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if !matches!(scheme, "redis" | "rediss") {
        return Err(bad_url(url, "unsupported scheme"));
    }
    let info = url
        .into_connection_info()
        .map_err(|_| bad_url(url, "it does not parse"))?;
    let redis_settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    target(
        info.set_redis_settings(redis_settings),
        scheme == "rediss",
        key_prefix,
        socket_timeout,
    )
}

fn target(
    info: redis::ConnectionInfo,
    tls: bool,
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
    let client = redis::Client::open(info)
        .map_err(|e| LockError::invalid("redis connection", e.to_string()))?;
    Ok(RedisTarget {
        client,
        key_prefix,
        socket_timeout,
        tls,
        script_mode: ScriptMode::Auto,
    })
}

/// The Redis target a `type: redis` configuration describes.
pub(crate) fn target_from_config(config: &StoreConfig) -> Result<RedisTarget, LockError> {
    let mut target = target_from_config_address(config)?;
    target.script_mode = config.script_mode;
    Ok(target)
}

fn target_from_config_address(config: &StoreConfig) -> Result<RedisTarget, LockError> {
    let host = config.host.as_deref().unwrap_or("localhost").trim();
    if host.contains("://") {
        let mut t = target_from_url(host, config.key_prefix.as_deref(), config.socket_timeout)?;
        if config.db.is_some() || config.username.is_some() || config.password.is_some() {
            let info = t.client.get_connection_info().clone();
            let info = with_credentials(info, config);
            t.client = redis::Client::open(info)
                .map_err(|e| LockError::invalid("redis connection", e.to_string()))?;
        }
        return Ok(t);
    }
    if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
        return Err(LockError::invalid(
            "host",
            format!("{host:?} is not a host name or address"),
        ));
    }
    let port = config.port.unwrap_or(DEFAULT_PORT);
    if port == 0 {
        return Err(LockError::invalid("port", "0 is not a usable port"));
    }
    let scheme = if config.use_ssl { "rediss" } else { "redis" };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let url = format!("{scheme}://{host}:{port}/");
    let info = url
        .as_str()
        .into_connection_info()
        .map_err(|_| bad_url(&url, "it does not parse"))?;
    let info = with_credentials(info, config);
    target(
        info,
        config.use_ssl,
        config.key_prefix.as_deref(),
        config.socket_timeout,
    )
}

fn with_credentials(info: redis::ConnectionInfo, config: &StoreConfig) -> redis::ConnectionInfo {
    let mut settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    settings = settings.set_db(config.db.unwrap_or(DEFAULT_DB));
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password);
    }
    info.set_redis_settings(settings)
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

    #[test]
    fn configs_follow_rasa_defaults() {
        let t = target_from_config(&StoreConfig::redis("10.1.2.3")).unwrap();
        let info = t.client.get_connection_info();
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
}
