//! The Redis backend: every operation is one of the Lua scripts in `lua/`,
//! run atomically by SHA over one multiplexed, reconnecting connection (to
//! one server, a Redis Cluster or the master Sentinel names; see
//! [`connection`](super::connection)).
//!
//! Wake-ups ride the same connection: it speaks RESP3, so pub/sub messages
//! arrive as pushes while commands keep flowing, and the connection
//! resubscribes after a reconnect. A reconnect may have lost messages, so it
//! tells every local waiter to ask the store again.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use super::connection::{Conn, Connector, Invoker};
use super::memory::ceil_ms;
use super::{
    Backend, Fault, IssueArgs, Issued, Polled, Record, Released, Removal, Remover, Renewal, Result,
    Subscription, TicketRef, Updated,
};
use crate::config::ScriptMode;
use crate::inspect::{InspectedRecord, InspectedTicket, Inspection};
use crate::keys::KeySpace;
use crate::notify::Notifier;
use crate::scripts::{self, Invoke, Script};
use crate::ticket::{Ticket, TicketLock};

/// The Redis backend; cloning shares the connection.
#[derive(Clone)]
pub(crate) struct RedisBackend {
    conn: Conn,
    keys: KeySpace,
    invoke: Invoker,
    notifier: Arc<Notifier>,
    /// Bounds every call.
    pub(crate) socket_timeout: Duration,
    /// Differential tests only: the hash the scripts read the time from.
    manual_clock: Option<Arc<str>>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Connects; `client` must be configured for RESP3.
    pub(crate) async fn connect(
        client: Connector,
        keys: KeySpace,
        socket_timeout: Duration,
        mode: ScriptMode,
    ) -> redis::RedisResult<Self> {
        let notifier = Arc::new(Notifier::default());
        let conn = Conn::connect(client, socket_timeout, notifier.clone()).await?;
        let invoke = match mode {
            ScriptMode::Eval => Invoker::new(Invoke::Eval, false),
            ScriptMode::Functions => {
                conn.load_library().await?;
                Invoker::new(Invoke::Functions, false)
            }
            ScriptMode::Auto => Invoker::new(conn.functions_usable(&keys).await?, true),
        };
        Ok(RedisBackend {
            conn,
            keys,
            invoke,
            notifier,
            socket_timeout,
            manual_clock: None,
        })
    }

    /// The same backend with every script reading its clock from `clock_key`
    /// (see `Script::with_manual_clock`). Tests only.
    pub(crate) fn with_manual_clock(mut self, clock_key: &str) -> Self {
        self.manual_clock = Some(clock_key.into());
        self
    }

    async fn run(&self, script: &Script, cid: &str, args: &[String]) -> Result<Vec<i64>> {
        let reply = self.run_raw(script, cid, args).await?;
        integers(script.name(), reply)
    }

    async fn run_raw(&self, script: &Script, cid: &str, args: &[String]) -> Result<Value> {
        let reply = self.call(script, cid, args).await?;
        if let Value::Push { kind, .. } = &reply {
            // redis-rs 1.8 takes a pub/sub push the server sends unasked (a
            // cluster node dropping a sharded subscription whose slot moved)
            // for the reply of the oldest call in flight. This call's real
            // outcome is unknown, so it fails retryably, like a lost
            // connection; and messages may have been missed.
            self.notifier.send_all(crate::notify::Notice::Recheck);
            return Err(Fault::Store {
                retryable: true,
                unknown_outcome: true,
                source: format!(
                    "{}.lua got a {kind:?} pub/sub message for its reply; its outcome is unknown",
                    script.name()
                )
                .into(),
            });
        }
        Ok(reply)
    }

    async fn call(&self, script: &Script, cid: &str, args: &[String]) -> Result<Value> {
        let keys = [self.keys.key(cid)];
        Ok(match (&self.manual_clock, &self.conn) {
            (None, conn) => conn.run(script.call(&keys, args), &self.invoke).await?,
            (Some(clock_key), Conn::Standard(conn)) => {
                let code = script.with_manual_clock(clock_key);
                let mut call = redis::cmd("EVAL");
                call.arg(code).arg(keys.len()).arg(&keys).arg(args);
                call.query_async(&mut conn.clone()).await?
            }
            (Some(_), _) => {
                return Err(Fault::Reply(
                    "a manual clock needs a standalone server".into(),
                ))
            }
        })
    }
}

fn integers(script: &str, reply: Value) -> Result<Vec<i64>> {
    redis::from_redis_value(reply).map_err(|e| {
        Fault::Reply(format!(
            "{script}.lua replied with something else than integers: {e}"
        ))
    })
}

fn shape(script: &str, reply: &[i64]) -> Fault {
    Fault::Reply(format!(
        "{script}.lua replied {reply:?}, which does not match its contract"
    ))
}

fn ms(value: i64) -> Option<Duration> {
    u64::try_from(value).ok().map(Duration::from_millis)
}

fn number(value: i64) -> Option<u64> {
    u64::try_from(value).ok()
}

fn epoch_arg(ticket: TicketRef) -> String {
    ticket.epoch.map(|e| e.to_string()).unwrap_or_default()
}

/// lua/issue.lua's reply: { ticket, epoch, now_serving, head_remaining_ms, fence },
/// all -1 when a cancel came first.
pub(crate) fn decode_issue(reply: &[i64]) -> Result<Option<Issued>> {
    match *reply {
        [-1, -1, -1, -1, -1] => Ok(None),
        [ticket, epoch, now_serving, head, fence]
            if ticket >= 0
                && epoch >= 0
                && now_serving >= 0
                && now_serving <= ticket
                && (fence >= 0) == (ticket == now_serving) =>
        {
            Ok(Some(Issued {
                ticket: ticket as u64,
                epoch: epoch as u64,
                now_serving: now_serving as u64,
                head_remaining: ms(head),
                fence: number(fence),
            }))
        }
        _ => Err(shape("issue", reply)),
    }
}

/// lua/poll.lua's reply: { status, now_serving, ahead, head_remaining_ms, own_remaining_ms, fence }.
pub(crate) fn decode_poll(reply: &[i64]) -> Result<Polled> {
    match *reply {
        [1, _, _, _, own, fence] if fence >= 0 && own >= 0 => Ok(Polled::Served {
            fence: fence as u64,
            remaining: Duration::from_millis(own as u64),
        }),
        [-1, _, _, _, _, _] => Ok(Polled::Gone),
        [0, _, ahead, head, own, _] if ahead >= 0 && own >= 0 => Ok(Polled::Waiting {
            ahead: ahead as u64,
            head_remaining: ms(head),
            own_remaining: Duration::from_millis(own as u64),
        }),
        _ => Err(shape("poll", reply)),
    }
}

/// lua/release.lua's reply: { removed, now_serving }.
pub(crate) fn decode_release(reply: &[i64]) -> Result<Released> {
    match *reply {
        [removed @ (0 | 1), now_serving] => Ok(Released {
            removed: removed == 1,
            now_serving: number(now_serving),
        }),
        _ => Err(shape("release", reply)),
    }
}

/// lua/cancel.lua's reply: { found, ticket }.
pub(crate) fn decode_cancel(reply: &[i64]) -> Result<Option<u64>> {
    match *reply {
        [1, ticket] if ticket >= 0 => Ok(Some(ticket as u64)),
        [0, -1] => Ok(None),
        _ => Err(shape("cancel", reply)),
    }
}

/// lua/read.lua's reply: { exists, next, epoch, live, then number, remaining_ms,
/// lease_ms, liveness_ms per ticket }.
pub(crate) fn decode_read(reply: &[i64]) -> Result<Option<Record>> {
    match reply {
        [0] => Ok(None),
        [1, next, epoch, live, rest @ ..]
            if *next >= 0 && *epoch >= 0 && *live >= 0 && rest.len() % 4 == 0 =>
        {
            let tickets = rest
                .chunks_exact(4)
                .map(
                    |t| match (number(t[0]), ms(t[1]), number(t[2]), number(t[3])) {
                        (Some(n), Some(left), Some(0), Some(0)) => Ok(Ticket::new(n, left)),
                        (Some(n), Some(left), Some(lease), Some(liveness))
                            if lease > 0 && liveness > 0 =>
                        {
                            Ok(Ticket::renewing(
                                n,
                                left,
                                Duration::from_millis(lease),
                                Duration::from_millis(liveness),
                            ))
                        }
                        _ => Err(shape("read", reply)),
                    },
                )
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(Record {
                next: *next as u64,
                epoch: *epoch as u64,
                live: *live as u64,
                tickets,
            }))
        }
        _ => Err(shape("read", reply)),
    }
}

/// lua/extend.lua's reply: { held, remaining_ms }.
pub(crate) fn decode_extend(reply: &[i64]) -> Result<Option<Duration>> {
    match *reply {
        [1, left] if left >= 0 => Ok(Some(Duration::from_millis(left as u64))),
        [0, _] => Ok(None),
        _ => Err(shape("extend", reply)),
    }
}

/// lua/update.lua's reply: { pruned, now_serving }.
pub(crate) fn decode_update(reply: &[i64]) -> Result<Updated> {
    match *reply {
        [pruned, now_serving] if pruned >= 0 => Ok(Updated {
            pruned: pruned as u64,
            now_serving: number(now_serving),
        }),
        _ => Err(shape("update", reply)),
    }
}

/// lua/save.lua's reply: { now_serving }; lua/delete.lua's: { existed }.
fn decode_single(script: &str, reply: &[i64]) -> Result<i64> {
    match *reply {
        [value] => Ok(value),
        _ => Err(shape(script, reply)),
    }
}

/// lua/inspect.lua's reply: eleven integers, then per ticket four integers
/// and the request id (a string, "" for none).
pub(crate) fn decode_inspect(reply: Value) -> Result<Inspection> {
    let bad = |why: &str| {
        Fault::Reply(format!(
            "inspect.lua replied something else than its contract: {why}"
        ))
    };
    let Value::Array(items) = reply else {
        return Err(bad("not an array"));
    };
    let int = |v: &Value| match v {
        Value::Int(i) => Ok(*i),
        _ => Err(bad("a field is not an integer")),
    };
    if items.len() < 11 || (items.len() - 11) % 5 != 0 {
        return Err(bad("wrong length"));
    }
    let head: Vec<i64> = items[..11].iter().map(int).collect::<Result<_>>()?;
    let ttl = ms(head[7]);
    let cancelled = number(head[10]).ok_or_else(|| bad("cancelled < 0"))?;
    if head[0] == 0 {
        return Ok(Inspection {
            record: None,
            ttl,
            cancelled_requests: cancelled,
        });
    }
    let field = |i: usize, what: &str| number(head[i]).ok_or_else(|| bad(what));
    let tickets = items[11..]
        .chunks_exact(5)
        .map(|t| {
            let request = match &t[4] {
                Value::BulkString(b) if b.is_empty() => None,
                Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => return Err(bad("a request id is not a string")),
            };
            let positive = |v: i64| number(v).filter(|&n| n > 0).map(Duration::from_millis);
            Ok(InspectedTicket {
                number: number(int(&t[0])?).ok_or_else(|| bad("ticket < 0"))?,
                remaining_ms: int(&t[1])?,
                lease: positive(int(&t[2])?),
                dead_waiter_timeout: positive(int(&t[3])?),
                request,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Inspection {
        record: Some(InspectedRecord {
            next: field(1, "next < 0")?,
            epoch: field(2, "epoch < 0")?,
            head: number(head[3]),
            served: number(head[4]),
            fence: number(head[5]),
            granted_ago: ms(head[6]),
            live: field(8, "live < 0")?,
            expired: field(9, "expired < 0")?,
            tickets,
        }),
        ttl,
        cancelled_requests: cancelled,
    })
}

impl Backend for RedisBackend {
    async fn issue(&self, cid: &str, issue: IssueArgs<'_>) -> Result<Option<Issued>> {
        let args = [
            issue.lifetime_ms.to_string(),
            issue.liveness_ms.map(|l| l.to_string()).unwrap_or_default(),
            issue.request.unwrap_or_default().to_owned(),
        ];
        decode_issue(&self.run(&scripts::ISSUE, cid, &args).await?)
    }

    async fn cancel(&self, cid: &str, request: &str, remember_ms: u64) -> Result<Option<u64>> {
        let args = [request.to_owned(), remember_ms.to_string()];
        decode_cancel(&self.run(&scripts::CANCEL, cid, &args).await?)
    }

    async fn extend(&self, cid: &str, renewal: Renewal) -> Result<Option<Duration>> {
        let args = [
            renewal.ticket.to_string(),
            renewal.fence.to_string(),
            renewal.lease_ms.to_string(),
        ];
        decode_extend(&self.run(&scripts::EXTEND, cid, &args).await?)
    }

    async fn poll(&self, cid: &str, ticket: TicketRef) -> Result<Polled> {
        let args = [ticket.number.to_string(), epoch_arg(ticket)];
        decode_poll(&self.run(&scripts::POLL, cid, &args).await?)
    }

    async fn release(&self, cid: &str, removal: Removal) -> Result<Released> {
        let Removal { ticket, mode, by } = removal;
        let args = [
            ticket.number.to_string(),
            mode.as_str().to_owned(),
            epoch_arg(ticket),
            match by {
                Remover::Owner => "owner".to_owned(),
                Remover::Admin => String::new(),
            },
        ];
        decode_release(&self.run(&scripts::RELEASE, cid, &args).await?)
    }

    async fn read(&self, cid: &str, limit: Option<u64>) -> Result<Option<Record>> {
        let limit = limit.map_or("-1".to_owned(), |l| l.to_string());
        decode_read(&self.run(&scripts::READ, cid, &[limit]).await?)
    }

    async fn save(&self, lock: &TicketLock) -> Result<Option<u64>> {
        let mut args = Vec::with_capacity(1 + 4 * lock.tickets().len());
        args.push(lock.next_number().to_string());
        for t in lock.tickets() {
            args.push(t.number().to_string());
            // Round up like lifetimes do: a positive remainder never becomes "expired".
            args.push(ceil_ms(t.expires_in()).to_string());
            args.push(t.lease().map_or(0, ceil_ms).to_string());
            args.push(t.dead_waiter_timeout().map_or(0, ceil_ms).to_string());
        }
        let reply = self
            .run(&scripts::SAVE, lock.conversation_id(), &args)
            .await?;
        Ok(number(decode_single("save", &reply)?))
    }

    async fn delete(&self, cid: &str) -> Result<bool> {
        Ok(decode_single("delete", &self.run(&scripts::DELETE, cid, &[]).await?)? == 1)
    }

    async fn update(&self, cid: &str) -> Result<Updated> {
        decode_update(&self.run(&scripts::UPDATE, cid, &[]).await?)
    }

    async fn inspect(&self, cid: &str, limit: Option<u64>) -> Result<Inspection> {
        let limit = limit.map_or("-1".to_owned(), |l| l.to_string());
        decode_inspect(self.run_raw(&scripts::INSPECT, cid, &[limit]).await?)
    }

    async fn subscribe(&self, cid: &str) -> Result<Subscription> {
        let channel = self.keys.key(cid);
        let (notices, server) = self.notifier.join(&channel);
        // Built before the first await, so a cancelled subscribe still leaves.
        let subscription = Subscription {
            notices,
            on_drop: Some(Box::new({
                let notifier = self.notifier.clone();
                let conn = self.conn.clone();
                let channel = channel.clone();
                let server = server.clone();
                move || leave(notifier, conn, channel, server)
            })),
        };
        let mut subscribed = server.lock().await;
        if !*subscribed {
            self.conn.subscribe(&channel).await?;
            *subscribed = true;
        }
        drop(subscribed);
        Ok(subscription)
    }
}

/// The last local listener of a channel unsubscribes, in the background.
/// Subscribe and unsubscribe both hold the channel's server lock and look at
/// the listener count under it, so the server ends up subscribed exactly
/// when someone listens.
fn leave(
    notifier: Arc<Notifier>,
    conn: Conn,
    channel: String,
    server: Arc<tokio::sync::Mutex<bool>>,
) {
    if !notifier.leave(&channel) {
        return;
    }
    // Without a runtime the subscription simply stays; it costs the server a
    // few bytes and is dropped with the connection.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut subscribed = server.lock().await;
        if notifier.is_idle(&channel) {
            if *subscribed {
                // A failure leaves a stray subscription whose messages nobody reads.
                let _ = conn.unsubscribe(&channel).await;
                *subscribed = false;
            }
            notifier.forget_if_idle(&channel);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_that_break_the_contract_are_errors_not_panics() {
        assert!(decode_issue(&[]).is_err());
        assert!(decode_issue(&[-1, 0, 0, 0, -1]).is_err());
        assert!(decode_issue(&[1, 0, 1, 0, -1]).is_err());
        assert!(decode_issue(&[1, 0, 2, 0, -1]).is_err());
        assert_eq!(decode_issue(&[-1, -1, -1, -1, -1]).unwrap(), None);
        assert!(decode_poll(&[7, 0, 0, 0, 0, -1]).is_err());
        assert!(decode_poll(&[0, 0, -3, 0, 5, -1]).is_err());
        assert!(decode_poll(&[1, 0, 0, 0, 5, -1]).is_err());
        assert!(decode_poll(&[1, 0, 0, 0, -1, 9]).is_err());
        assert!(decode_extend(&[1, -1]).is_err());
        assert!(decode_release(&[2, 0]).is_err());
        assert!(decode_cancel(&[1, -1]).is_err());
        assert!(decode_cancel(&[0, 3]).is_err());
        assert!(decode_read(&[1, 0, 0, 0, 5]).is_err());
        assert!(decode_read(&[1, 0, 0, 1, -5, 3, 0, 0]).is_err());
        assert!(decode_read(&[1, 0, 0, 1, 5, 3, 10, 0]).is_err());
        assert!(decode_update(&[-1, 0]).is_err());
        assert!(decode_inspect(Value::Array(vec![Value::Int(1)])).is_err());
        assert_eq!(decode_read(&[0]).unwrap(), None);
        assert_eq!(
            decode_read(&[1, 2, 7, 1, 1, 30, 100, 50]).unwrap(),
            Some(Record {
                next: 2,
                epoch: 7,
                live: 1,
                tickets: vec![Ticket::renewing(
                    1,
                    Duration::from_millis(30),
                    Duration::from_millis(100),
                    Duration::from_millis(50)
                )],
            })
        );
        assert_eq!(
            decode_poll(&[0, 3, 2, 10, 50, -1]).unwrap(),
            Polled::Waiting {
                ahead: 2,
                head_remaining: Some(Duration::from_millis(10)),
                own_remaining: Duration::from_millis(50)
            }
        );
    }
}
