//! Test-only constructors behind the hidden `ticketlock::__testing` module:
//! stores whose clock stands still until a test moves it. Production code has
//! no way to reach these; they exist so the differential tests can compare
//! expiry to the millisecond.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use crate::backend::connect;
use crate::backend::connection::Connector;
use crate::backend::memory::MemoryBackend;
use crate::backend::{AnyBackend, Backend, Fault, Subscription};
use crate::config::{self, ScriptMode, StoreConfig};
use crate::notify::{Notice, Removed};
use crate::options::DEFAULT_LIFETIME;
use crate::{LockError, LockStore};

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Moves);

#[derive(Debug)]
enum Moves {
    Memory(MemoryBackend),
    Redis {
        conn: redis::aio::MultiplexedConnection,
        key: String,
        now_us: AtomicU64,
    },
}

impl ManualClock {
    /// Moves the clock forward by `by`.
    pub async fn advance(&self, by: Duration) {
        match &self.0 {
            Moves::Memory(backend) => backend.advance(by),
            Moves::Redis { conn, key, now_us } => {
                let us = now_us.fetch_add(by.as_micros() as u64, Ordering::SeqCst)
                    + by.as_micros() as u64;
                let _: () = redis::cmd("HSET")
                    .arg(key)
                    .arg("s")
                    .arg(us / 1_000_000)
                    .arg("us")
                    .arg(us % 1_000_000)
                    .query_async(&mut conn.clone())
                    .await
                    .expect("setting the manual clock");
            }
        }
    }
}

/// An in-memory store and a Redis store (keys under `prefix`), each on a
/// manual clock starting at the same instant.
pub async fn manual_clock_stores(
    url: &str,
    prefix: &str,
) -> Result<((LockStore, ManualClock), (LockStore, ManualClock)), LockError> {
    let memory = MemoryBackend::with_manual_clock();
    let memory_store =
        LockStore::with_backend(AnyBackend::Memory(memory.clone()), DEFAULT_LIFETIME);

    let mut config = StoreConfig::from_url(url)?;
    config.key_prefix = Some(prefix.to_owned());
    config.script_mode = ScriptMode::Eval;
    let deployment = config::resolve(&config)?;
    let Connector::Standard(client) = connect::connector(&deployment)? else {
        return Err(LockError::invalid(
            "url",
            "a manual clock needs a standalone server",
        ));
    };
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| Fault::from(e).into_error(None))?;
    // An hour ahead of the real clock, so Redis's own (real-time) key expiry
    // never strikes first; the scripts emulate expiry on the manual clock.
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        + Duration::from_secs(3600);
    let key = format!("__ticketlock_test_clock:{prefix}");
    let clock = ManualClock(Moves::Redis {
        conn,
        key: key.clone(),
        now_us: AtomicU64::new(start.as_micros() as u64),
    });
    clock.advance(Duration::ZERO).await;
    let backend = connect::open(deployment).await?.with_manual_clock(&key);
    let redis_store = LockStore::with_backend(AnyBackend::Redis(backend), DEFAULT_LIFETIME);
    Ok((
        (memory_store, ManualClock(Moves::Memory(memory))),
        (redis_store, clock),
    ))
}

/// The wake-ups a store sends about one conversation, kept as they arrive,
/// so a test can compare what the two backends announce.
#[derive(Debug)]
pub struct Wakeups {
    subscription: Subscription,
}

impl Wakeups {
    /// Starts listening on `store`'s wake-ups for `conversation_id`.
    pub async fn listen(store: &LockStore, conversation_id: &str) -> Result<Wakeups, LockError> {
        let subscription = store
            .on(conversation_id, |b| b.subscribe(conversation_id))
            .await?;
        Ok(Wakeups { subscription })
    }

    /// The wake-ups received since the last call, oldest first, each as
    /// "serving <n> removed <n|several> left <ms>" (`-` for none). Epochs and
    /// fencing tokens are left out: they are clock readings, and the two
    /// stores' clocks start at different instants.
    pub fn take(&mut self) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.subscription.notices.try_recv() {
                Ok(Notice::Changed {
                    serving,
                    removed,
                    serving_left,
                    ..
                }) => {
                    let removed = match removed {
                        Removed::None => "-".to_owned(),
                        Removed::Ticket(n) => n.to_string(),
                        Removed::Several => "several".to_owned(),
                    };
                    seen.push(format!(
                        "serving {} removed {removed} left {}",
                        or_dash(serving),
                        or_dash(serving_left.map(|d| d.as_millis())),
                    ));
                }
                Ok(Notice::Recheck) => seen.push("recheck".to_owned()),
                Err(broadcast::error::TryRecvError::Lagged(n)) => seen.push(format!("lagged {n}")),
                Err(_) => return seen,
            }
        }
    }
}

fn or_dash(value: Option<impl std::fmt::Display>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}
