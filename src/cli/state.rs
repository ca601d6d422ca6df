//! What the simulated handlers share besides the lock: the probes that tell
//! whether the lock did its job. In memory for one process; in Redis, under
//! `sim:<run id>:{<conversation id>}:...`, when several processes take part.
//! Every probe key expires [`PROBE_TTL`] after its last write, so a run that
//! dies without cleaning up (SIGKILL, a lost Redis) leaves nothing for good.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use ticketlock::{LockError, StoreConfig};

/// How long a probe key outlives its last write; a run touches each key at
/// least once per message of the conversation, and a hold is at most an hour.
pub(crate) const PROBE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Conversations per pipeline when reading results or deleting keys.
const CHUNK: usize = 500;

/// Wall-clock nanoseconds: the processes of one run agree on it.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What a handler learns when it enters a critical section.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entered {
    /// Someone else was inside this conversation's critical section.
    pub(crate) overlap: bool,
    /// The conversation's counter as read (the first half of a non-atomic increment).
    pub(crate) counter: u64,
    /// When the previous holder started releasing ([`now_ns`]), if anyone held it before.
    pub(crate) released_at: Option<u64>,
}

/// One conversation's record after the run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    /// Ticket numbers in the order their critical sections ran.
    pub(crate) grants: Vec<u64>,
    /// The counter every critical section incremented once.
    pub(crate) counter: u64,
}

/// The probes, in this process or in Redis.
#[derive(Clone)]
pub(crate) enum Shared {
    Memory(Arc<[MemoryConversation]>),
    Redis(RedisShared),
}

#[derive(Debug, Default)]
pub(crate) struct MemoryConversation {
    inside: AtomicU64,
    counter: AtomicU64,
    grants: Mutex<Vec<u64>>,
    released_at: Mutex<Option<u64>>,
}

#[derive(Clone)]
pub(crate) struct RedisShared {
    conn: MultiplexedConnection,
    keys: Arc<[Keys]>,
}

/// `sim:<run id>:{<conversation id>}:<name>`.
#[derive(Debug)]
struct Keys {
    inside: String,
    counter: String,
    grants: String,
    released_at: String,
}

impl Keys {
    fn new(run_id: &str, conversation_id: &str) -> Self {
        let base = format!("sim:{run_id}:{{{conversation_id}}}");
        Keys {
            inside: format!("{base}:inside"),
            counter: format!("{base}:counter"),
            grants: format!("{base}:log"),
            released_at: format!("{base}:released_at"),
        }
    }
}

fn ttl_ms() -> u64 {
    PROBE_TTL.as_millis() as u64
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub(crate) fn memory(conversations: usize) -> Self {
        Shared::Memory((0..conversations).map(|_| Default::default()).collect())
    }

    /// A plain connection of its own (not the lock's), so the probes never
    /// share a queue with the lock's commands.
    pub(crate) async fn redis(
        config: &StoreConfig,
        run_id: &str,
        conversation_ids: &[String],
    ) -> Result<Self, LockError> {
        let conn = ticketlock::__cli::connection(config).await?;
        let keys = conversation_ids
            .iter()
            .map(|cid| Keys::new(run_id, cid))
            .collect();
        Ok(Shared::Redis(RedisShared { conn, keys }))
    }

    /// Steps 1 and 2a of a critical section, plus the read for step 4: mark
    /// ourselves inside (an overlap if someone already was), read the counter
    /// and when the previous holder started releasing.
    pub(crate) async fn enter(&self, c: usize) -> redis::RedisResult<Entered> {
        match self {
            Shared::Memory(convs) => {
                let conv = &convs[c];
                let before = conv.inside.fetch_add(1, Ordering::SeqCst);
                Ok(Entered {
                    overlap: before != 0,
                    counter: conv.counter.load(Ordering::SeqCst),
                    released_at: *lock(&conv.released_at),
                })
            }
            Shared::Redis(r) => {
                let k = &r.keys[c];
                let (inside, counter, released_at): (i64, Option<u64>, Option<u64>) = redis::pipe()
                    .incr(&k.inside, 1)
                    .pexpire(&k.inside, ttl_ms() as i64)
                    .ignore()
                    .get(&k.counter)
                    .get(&k.released_at)
                    .query_async(&mut r.conn.clone())
                    .await?;
                Ok(Entered {
                    overlap: inside != 1,
                    counter: counter.unwrap_or(0),
                    released_at,
                })
            }
        }
    }

    /// Steps 2b and 3: write the counter back, append our ticket to the grant log.
    pub(crate) async fn commit(
        &self,
        c: usize,
        counter: u64,
        ticket: u64,
    ) -> redis::RedisResult<()> {
        match self {
            Shared::Memory(convs) => {
                let conv = &convs[c];
                conv.counter.store(counter, Ordering::SeqCst);
                lock(&conv.grants).push(ticket);
                Ok(())
            }
            Shared::Redis(r) => {
                let k = &r.keys[c];
                redis::pipe()
                    .pset_ex(&k.counter, counter, ttl_ms())
                    .ignore()
                    .rpush(&k.grants, ticket)
                    .ignore()
                    .pexpire(&k.grants, ttl_ms() as i64)
                    .ignore()
                    .query_async(&mut r.conn.clone())
                    .await
            }
        }
    }

    /// Step 5, before the lock is released: note when releasing started and
    /// mark ourselves outside.
    pub(crate) async fn leave(&self, c: usize) -> redis::RedisResult<()> {
        match self {
            Shared::Memory(convs) => {
                let conv = &convs[c];
                *lock(&conv.released_at) = Some(now_ns());
                conv.inside.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
            Shared::Redis(r) => {
                let k = &r.keys[c];
                redis::pipe()
                    .pset_ex(&k.released_at, now_ns(), ttl_ms())
                    .ignore()
                    // Keeps the expiry INCR's key got on entering.
                    .decr(&k.inside, 1)
                    .ignore()
                    .query_async(&mut r.conn.clone())
                    .await
            }
        }
    }

    /// Critical sections completed so far, over all conversations.
    pub(crate) async fn handled(&self) -> redis::RedisResult<u64> {
        match self {
            Shared::Memory(convs) => Ok(convs.iter().map(|c| lock(&c.grants).len() as u64).sum()),
            Shared::Redis(r) => {
                let mut total = 0;
                for chunk in r.keys.chunks(CHUNK) {
                    let mut pipe = redis::pipe();
                    for k in chunk {
                        pipe.llen(&k.grants);
                    }
                    let lens: Vec<u64> = pipe.query_async(&mut r.conn.clone()).await?;
                    total += lens.iter().sum::<u64>();
                }
                Ok(total)
            }
        }
    }

    /// Every conversation's grant log and counter.
    pub(crate) async fn outcomes(&self) -> redis::RedisResult<Vec<Outcome>> {
        match self {
            Shared::Memory(convs) => Ok(convs
                .iter()
                .map(|c| Outcome {
                    grants: lock(&c.grants).clone(),
                    counter: c.counter.load(Ordering::SeqCst),
                })
                .collect()),
            Shared::Redis(r) => {
                let mut out = Vec::with_capacity(r.keys.len());
                for chunk in r.keys.chunks(CHUNK) {
                    let mut logs = redis::pipe();
                    let mut counters = redis::pipe();
                    for k in chunk {
                        logs.lrange(&k.grants, 0, -1);
                        counters.get(&k.counter);
                    }
                    let logs: Vec<Vec<u64>> = logs.query_async(&mut r.conn.clone()).await?;
                    let counters: Vec<Option<u64>> =
                        counters.query_async(&mut r.conn.clone()).await?;
                    out.extend(
                        logs.into_iter()
                            .zip(counters)
                            .map(|(grants, counter)| Outcome {
                                grants,
                                counter: counter.unwrap_or(0),
                            }),
                    );
                }
                Ok(out)
            }
        }
    }

    /// Deletes the probe keys (nothing to do in memory).
    pub(crate) async fn cleanup(&self) -> redis::RedisResult<()> {
        let Shared::Redis(r) = self else {
            return Ok(());
        };
        for chunk in r.keys.chunks(CHUNK) {
            let mut del = redis::cmd("DEL");
            for k in chunk {
                del.arg(&k.inside)
                    .arg(&k.counter)
                    .arg(&k.grants)
                    .arg(&k.released_at);
            }
            del.query_async::<()>(&mut r.conn.clone()).await?;
        }
        Ok(())
    }
}
