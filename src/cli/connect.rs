//! A plain Redis connection for the subcommands that talk to Redis directly
//! (`inspect`, `scripts load`) rather than through a [`ticketlock::LockStore`].

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use ticketlock::DEFAULT_SOCKET_TIMEOUT;

use super::{is_memory_url, redact_url, CliError};

/// The URL from `--redis` / `REDIS_URL`; `command` needs one (exit 2 without).
pub(crate) fn required_url(redis: Option<&str>, command: &str) -> Result<String, CliError> {
    match redis {
        Some(url) if !is_memory_url(url) => Ok(url.trim().to_owned()),
        _ => Err(CliError::usage(format!(
            "{command} needs --redis URL (or REDIS_URL): redis://[user:password@]host[:port][/db] \
             or rediss://...; the in-memory store lives inside another process"
        ))),
    }
}

/// Connects to `url` (`redis://` or `rediss://`), every call bounded by the
/// library's default socket timeout. A malformed URL or an unreachable server
/// is exit 3; the password never shows.
pub(crate) async fn connect(url: &str) -> Result<MultiplexedConnection, CliError> {
    let shown = redact_url(url);
    let expected = "expected redis://[user:password@]host[:port][/db] or rediss://...";
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    if scheme.contains("+cluster") || scheme.contains("+sentinel") {
        return Err(CliError::store(format!(
            "{shown}: this command talks to one server; give the redis:// or rediss:// URL \
             of the node or master holding the conversation"
        )));
    }
    if !matches!(scheme, "redis" | "rediss") {
        return Err(CliError::store(format!(
            "invalid url: {shown}: unsupported scheme ({expected})"
        )));
    }
    if scheme == "rediss" {
        // rustls needs a process-wide crypto provider; another may already be installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let client = redis::Client::open(url).map_err(|_| {
        CliError::store(format!(
            "invalid url: {shown}: it does not parse ({expected})"
        ))
    })?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(DEFAULT_SOCKET_TIMEOUT))
        .set_response_timeout(Some(DEFAULT_SOCKET_TIMEOUT));
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| CliError::store(format!("cannot connect to {shown}: {e}")))?;
    tracing::debug!(redis = %shown, "connected");
    Ok(conn)
}
