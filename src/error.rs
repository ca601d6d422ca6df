//! The one public error type; every backend maps its own failures into it.

use std::time::Duration;

/// Everything a [`LockStore`](crate::LockStore) operation can fail with.
///
/// Messages are lowercase and name the conversation (and the ticket where
/// there is one). Backend errors are boxed as `source`, so no dependency's
/// error type is part of this API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The lock was not acquired within the configured timeout; the ticket was given back.
    #[error(
        "timed out after {waited:?} waiting for conversation {} ({})",
        shown(conversation_id),
        ticket.map_or("before the store issued a ticket".to_owned(), |t| format!("ticket {t}"))
    )]
    Timeout {
        /// The conversation waited for.
        conversation_id: String,
        /// The ticket that waited; it has been removed from the queue.
        /// `None` when the store did not even answer the issue in time (the
        /// ticket it may take later is given back all the same).
        ticket: Option<u64>,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The ticket expired or was removed (by `finish_serving`, `delete_lock`,
    /// `save_lock`): a waiting ticket will never be served; a held one has
    /// lost its lease.
    #[error(
        "ticket {ticket} of conversation {} expired or was removed",
        shown(conversation_id)
    )]
    Expired {
        /// The conversation waited for.
        conversation_id: String,
        /// The ticket that is gone.
        ticket: u64,
    },
    /// An argument or configuration value was rejected before anything was changed.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was wrong: `conversation id`, `lifetime`, `key prefix`, `url`, ...
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The conversation's stored data is not what ticketlock writes (for
    /// example a key of the wrong type written by someone else). Nothing was changed.
    #[error("conversation {} holds foreign data: {detail}", shown(conversation_id))]
    Corrupted {
        /// The conversation whose keys are foreign.
        conversation_id: String,
        /// What was found.
        detail: String,
    },
    /// The backend (Redis) failed: connection, timeout, server error.
    #[error("backend failed{}: {source}", conversation_id.as_deref().map(|c| format!(" for conversation {}", shown(c))).unwrap_or_default())]
    Backend {
        /// The conversation concerned, if the call was about one.
        conversation_id: Option<String>,
        /// Whether repeating the call may succeed (connection lost, timeout, server loading).
        retryable: bool,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl LockError {
    /// True when repeating the same call later may succeed: timeouts and
    /// transient backend failures (connection lost, server busy or loading).
    pub fn is_retryable(&self) -> bool {
        match self {
            LockError::Timeout { .. } => true,
            LockError::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        LockError::InvalidInput {
            what,
            reason: reason.into(),
        }
    }
}

/// Conversation ids can hold anything, newlines included; messages show a bounded,
/// escaped form so a hostile id cannot flood a log line or forge one.
pub(crate) fn shown(conversation_id: &str) -> String {
    const SHOWN: usize = 64;
    let mut out: String = conversation_id
        .chars()
        .take(SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    let total = conversation_id.chars().count();
    if total > SHOWN {
        out.push_str(&format!("... ({} bytes)", conversation_id.len()));
    }
    out
}
