#![doc = include_str!("../README.md")]
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
pub use crate::keys::conversation_keys;
pub use crate::options::{
    LockOptions, DEFAULT_DEAD_WAITER_TIMEOUT, DEFAULT_LIFETIME, DEFAULT_WAIT_TIME, LIFETIME_ENV,
};
pub use crate::scripts::{
    library as functions_library, scripts as lua_scripts, Script as LuaScript, LIBRARY_NAME,
};
pub use crate::store::{LockGuard, LockStore};
pub use crate::ticket::{Ticket, TicketLock};
pub use crate::validate::{DEFAULT_KEY_PREFIX, MAX_CONVERSATION_ID_LEN, MAX_LIFETIME};

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
            _ => false,
        }
    }
}

/// Fault injection for this crate's own tests; not part of the API and not
/// covered by semver.
#[doc(hidden)]
pub mod __testing {
    pub use crate::backend::faulty::{Injected, Op};
    pub use crate::testing::{manual_clock_stores, ManualClock};

    /// Checks a URL the way `LockStore::from_url` does, without connecting.
    pub fn check_url(url: &str) -> Result<(), crate::LockError> {
        if crate::config::is_memory_url(url) {
            return Ok(());
        }
        crate::config::target_from_url(url, None, None).map(drop)
    }

    /// Checks a configuration the way `LockStore::create` does, without connecting.
    pub fn check_config(config: &crate::StoreConfig) -> Result<(), crate::LockError> {
        crate::config::target_from_config(config).map(drop)
    }

    /// `store`, seen through a backend that asks `plan` what to do to each call.
    pub fn with_faults(
        store: &crate::LockStore,
        plan: impl Fn(Op) -> Injected + Send + Sync + 'static,
    ) -> crate::LockStore {
        store.with_faults(plan)
    }
}
