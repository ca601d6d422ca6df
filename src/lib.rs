//! Strictly first-in-first-out, expiring locks per conversation, shared by
//! any number of processes through Redis (every state change one atomic Lua
//! script) or kept in memory. Every message of a conversation takes a
//! numbered ticket; tickets are served in order; a lock's lease runs out, so
//! a crashed worker never blocks a conversation for good. Names and
//! semantics follow Rasa's `rasa.core.lock_store`, without its known bugs.
//!
//! ```
//! use std::time::Duration;
//! use ticketlock::{LockError, LockOptions, LockStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), LockError> {
//! // In memory here; `LockStore::from_url("redis://10.0.0.5:6379/1").await?` for a fleet.
//! let store = LockStore::in_memory();
//! let guard = store
//!     .lock_with("conv-42", LockOptions::default()
//!         .with_lifetime(Duration::from_secs(30))   // the lease, from the grant
//!         .with_timeout(Duration::from_secs(5)))    // give up (and give the ticket back) after 5 s
//!     .await?;
//! let _token = guard.fencing_token();               // grows with every grant
//! // ... handle the message: nobody else holds conv-42 until release ...
//! guard.release().await?;                           // the next waiter is woken at once
//! # Ok(()) }
//! ```
//!
//! # Where to start
//!
//! - [`LockStore`]: a handle on the store ([`in_memory`](LockStore::in_memory),
//!   [`from_url`](LockStore::from_url), [`create`](LockStore::create) from
//!   Rasa's `lock_store:` settings); [`lock`](LockStore::lock),
//!   [`lock_with`](LockStore::lock_with) and [`with_lock`](LockStore::with_lock),
//!   and Rasa's lower-level calls (`issue_ticket`, `get_lock`, `cleanup`, ...).
//! - [`LockGuard`]: a held lock: its fencing token, [`extend`](LockGuard::extend),
//!   [`lost`](LockGuard::lost), [`release`](LockGuard::release); what dropping it does.
//! - [`LockOptions`]: lease, timeout, poll interval, dead-waiter timeout, auto-renew.
//! - [`StoreConfig`]: one server, a Redis Cluster or Sentinel, with TLS and ACL
//!   users ([`DeploymentMode`] lists every URL and field form);
//!   [`StoreConfig::from_url`] reads a URL, and a config displays as its URL
//!   with the credentials hidden.
//! - [`LockError`]: the one error type; [`is_retryable`](LockError::is_retryable).
//! - [`lua_scripts`], [`functions_library`], [`conversation_keys`]: the Lua
//!   scripts and key layout, for clients in other languages.
//!
//! # Guarantees, in short
//!
//! Mutual exclusion and FIFO order per conversation; every change atomic in
//! Redis; a waiter keeps its place while it lives and a dead one stops
//! blocking the queue after the dead-waiter timeout; a held lock's lease runs
//! from the grant and can be renewed; fencing tokens only grow; hand-over is
//! pushed (pub/sub), polling only a safety net; dropping a pending `lock`
//! future gives its ticket back; every key expires; bad input is a typed
//! [`LockError`], never a panic; no password shows in any message or `Debug`.
//! The README in the repository spells each one out, with the command line
//! (`ticketlock simulate`, `inspect`, `scripts`), the Lua scripts' contract
//! for other clients, tests and benchmarks.
//!
//! # Features
//!
//! - `cli` (default): the `ticketlock` binary and what only it needs; a
//!   library user can leave it out with `default-features = false`.
//! - `tls-insecure`: lets `#insecure` / [`StoreConfig::ssl_insecure`] skip
//!   certificate checks; without it they are refused.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::future_not_send
)]

mod backend;
mod config;
mod error;
mod guard;
mod inspect;
mod keys;
mod notify;
mod options;
mod scripts;
mod store;
mod testing;
mod ticket;
mod validate;

pub use crate::config::{
    DeploymentMode, ScriptMode, StoreConfig, StoreType, DEFAULT_DB, DEFAULT_PORT,
    DEFAULT_SENTINEL_PORT, DEFAULT_SOCKET_TIMEOUT,
};
pub use crate::error::LockError;
pub use crate::guard::LockGuard;
pub use crate::inspect::{InspectedRecord, InspectedTicket, Inspection};
pub use crate::keys::conversation_keys;
pub use crate::options::{
    LockOptions, DEFAULT_DEAD_WAITER_TIMEOUT, DEFAULT_LIFETIME, DEFAULT_WAIT_TIME, LIFETIME_ENV,
};
pub use crate::scripts::{
    library as functions_library, scripts as lua_scripts, Script as LuaScript, LIBRARY_NAME,
};
pub use crate::store::LockStore;
pub use crate::ticket::{Ticket, TicketLock};
pub use crate::validate::{DEFAULT_KEY_PREFIX, MAX_CONVERSATION_ID_LEN, MAX_LIFETIME};

/// The README's Rust examples, run as doctests (the crate doc above leads
/// with the library; the README also covers the CLI, tests and benchmarks).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Entry points for the criterion micro-benchmarks in `benches/`; not part of
/// the API and not covered by semver.
#[doc(hidden)]
pub mod __bench {
    /// Decodes `reply` as the named script's reply; true when it fits the contract.
    pub fn decode(script: &str, reply: &[i64]) -> bool {
        use crate::backend::redis as r;
        match script {
            "issue" => r::decode_issue(reply).is_ok(),
            "poll" => r::decode_poll(reply).is_ok(),
            "release" => r::decode_release(reply).is_ok(),
            "read" => r::decode_read(reply).is_ok(),
            "update" => r::decode_update(reply).is_ok(),
            "extend" => r::decode_extend(reply).is_ok(),
            "cancel" => r::decode_cancel(reply).is_ok(),
            _ => false,
        }
    }
}

/// What the `ticketlock` binary needs beyond the API; not part of the API
/// and not covered by semver.
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod __cli {
    /// A conversation id (or key name) as messages show it: escaped and bounded.
    pub fn shown(text: &str) -> String {
        crate::error::shown(text)
    }

    /// A plain connection to the one server `config` names (`inspect`,
    /// `scripts load`), made like the store's: same URL grammar, TLS files,
    /// socket timeout and error hints.
    pub async fn connection(
        config: &crate::StoreConfig,
    ) -> Result<redis::aio::MultiplexedConnection, crate::LockError> {
        crate::backend::connect::one_server(&crate::config::resolve(config)?).await
    }
}

/// Fault injection for this crate's own tests; not part of the API and not
/// covered by semver.
#[doc(hidden)]
pub mod __testing {
    pub use crate::backend::faulty::{Injected, Op};
    pub use crate::testing::{manual_clock_stores, ManualClock, Wakeups};

    /// Checks a URL the way `LockStore::from_url` does, without connecting.
    pub fn check_url(url: &str) -> Result<(), crate::LockError> {
        let config = crate::StoreConfig::from_url(url)?;
        if config.store_type == crate::StoreType::InMemory {
            return Ok(());
        }
        check_config(&config)
    }

    /// Checks a configuration the way `LockStore::create` does (TLS files
    /// read), without connecting.
    pub fn check_config(config: &crate::StoreConfig) -> Result<(), crate::LockError> {
        crate::backend::connect::connector(&crate::config::resolve(config)?).map(drop)
    }

    /// `store`, seen through a backend that asks `plan` what to do to each call.
    pub fn with_faults(
        store: &crate::LockStore,
        plan: impl Fn(Op) -> Injected + Send + Sync + 'static,
    ) -> crate::LockStore {
        store.with_faults(plan)
    }
}
