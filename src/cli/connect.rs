//! A plain Redis connection for the subcommands that talk to Redis directly
//! (`inspect`, `scripts load`) rather than through a [`ticketlock::LockStore`].

use redis::aio::MultiplexedConnection;
use ticketlock::StoreConfig;

use super::{redis_config, store_error, CliError};

/// The configuration `--redis` / `REDIS_URL` names; `command` needs one
/// (exit 2 without; exit 3 for a malformed URL).
pub(crate) fn required_config(redis: Option<&str>, command: &str) -> Result<StoreConfig, CliError> {
    redis_config(redis)?.ok_or_else(|| {
        CliError::usage(format!(
            "{command} needs --redis URL (or REDIS_URL): redis://[user:password@]host[:port][/db] \
             or rediss://...; the in-memory store lives inside another process"
        ))
    })
}

/// Connects to the one server `config` names, as the library would (every
/// call bounded by its socket timeout). An unreachable server, or a
/// cluster or sentinel URL, is exit 3; the password never shows.
pub(crate) async fn connect(config: &StoreConfig) -> Result<MultiplexedConnection, CliError> {
    let conn = ticketlock::__cli::connection(config)
        .await
        .map_err(|e| store_error(config, e))?;
    tracing::debug!(redis = %config, "connected");
    Ok(conn)
}
