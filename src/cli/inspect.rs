//! `ticketlock inspect`: one conversation's queue in Redis as it stands.
//!
//! What an operator runs when a conversation seems stuck. Strictly read-only:
//! one MULTI/EXEC of TIME, TYPE, PTTL, HGETALL and ZRANGE, so the snapshot is
//! atomic and the scripts' own clock (Redis `TIME`) judges expiry exactly as
//! `lua/read.lua` does (a ticket is live while its expiry >= now). It works
//! with a `+@read` ACL user and on a replica.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::ExitCode;

use redis::Value;
use serde::Serialize;

use super::connect::{connect, required_url};
use super::{parse_prefix, print_error, print_out, redact_url, CliError, EXIT_CODES};

/// Arguments of `ticketlock inspect`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES)]
pub(crate) struct InspectArgs {
    /// The conversation id (1 to 1024 bytes; any characters).
    #[arg(value_name = "CONVERSATION_ID")]
    conversation_id: String,

    /// Redis holding the queue (redis://[user:password@]host[:port][/db] or rediss://...).
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    redis: Option<String>,

    /// ASCII-alphanumeric prefix of the lock's keys (<PREFIX>:lock:...; default lock:...).
    #[arg(long, value_name = "PREFIX", value_parser = parse_prefix)]
    key_prefix: Option<String>,

    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// The whole report; `--json` prints it as is.
#[derive(Debug, Serialize)]
struct Report {
    /// The conversation has a record (its meta hash holds an epoch).
    exists: bool,
    conversation_id: String,
    redis: String,
    /// Redis `TIME` when the snapshot was taken, in ms.
    redis_time_ms: i64,
    epoch: Option<u64>,
    /// The number the next ticket gets.
    next: Option<u64>,
    /// Live tickets.
    depth: usize,
    /// Tickets past their expiry that no script has pruned yet.
    expired: usize,
    /// The lowest live ticket: the one the lock belongs to.
    served: Option<Served>,
    /// The fencing token of the last grant (tokens only grow).
    last_fence: Option<u64>,
    /// Every ticket of the queue in serving order, expired ones included.
    tickets: Vec<TicketRow>,
    keys: Keys,
    /// The meta hash as stored.
    meta: BTreeMap<String, String>,
    /// Foreign or inconsistent data; non-empty means exit code 1.
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Served {
    ticket: u64,
    /// The scripts granted it (meta `served`); false while a grant is due
    /// (the previous holder's ticket expired and nothing ran since).
    granted: bool,
    /// The grant's fencing token.
    fence: Option<u64>,
    /// Its owner picked the grant up (meta `held`).
    held: bool,
    granted_ms_ago: Option<i64>,
}

#[derive(Debug, Serialize)]
struct TicketRow {
    position: usize,
    number: u64,
    /// `served`, `waiting` or `expired`.
    state: &'static str,
    /// ms until it expires (negative: expired that long ago); none without an expiry entry.
    remaining_ms: Option<i64>,
    expires_at_ms: Option<i64>,
    /// `renewing` (taken by `lock`: meta `l<n>`) or `fixed` (`issue_ticket`).
    kind: &'static str,
    lease_ms: Option<u64>,
    liveness_ms: Option<u64>,
    /// What its expiry is: `lifetime` (fixed), `lease` (held), `pick-up`
    /// (granted, not yet picked up), `check-in` (a waiter's liveness).
    deadline: &'static str,
}

#[derive(Debug, Serialize)]
struct Keys {
    meta: KeyInfo,
    queue: KeyInfo,
    expiry: KeyInfo,
}

#[derive(Debug, Serialize)]
struct KeyInfo {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    /// PTTL: ms to live, -1 no expiry, -2 no such key.
    pttl_ms: i64,
}

/// Runs `ticketlock inspect`.
pub(crate) async fn run(args: InspectArgs) -> Result<ExitCode, CliError> {
    let cid = &args.conversation_id;
    // The library validates the id and derives the keys, as the scripts expect them.
    let keys = ticketlock::conversation_keys(args.key_prefix.as_deref(), cid)
        .map_err(|e| CliError::usage(e.to_string()))?;
    let url = required_url(args.redis.as_deref(), "inspect")?;
    let mut conn = connect(&url).await?;
    let snapshot = read(&mut conn, &keys)
        .await
        .map_err(|e| CliError::store(format!("cannot read from {}: {e}", redact_url(&url))))?;
    tracing::debug!(
        meta = %keys[0],
        types = ?[&snapshot.types[0], &snapshot.types[1], &snapshot.types[2]],
        "snapshot read"
    );
    let report = Report::new(cid, &url, &keys, snapshot);
    if args.json {
        let line = serde_json::to_string(&report)
            .map_err(|e| CliError::store(format!("cannot encode the report: {e}")))?;
        print_out(&format!("{line}\n"));
    } else {
        print_out(&report.table());
    }
    if report.problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        print_error(&format!(
            "conversation {} holds foreign or inconsistent data: {}",
            shown(cid),
            report.problems.join("; ")
        ));
        Ok(ExitCode::FAILURE)
    }
}

/// What one MULTI/EXEC returned.
struct Snapshot {
    now_ms: i64,
    types: [String; 3],
    pttls: [i64; 3],
    /// HGETALL meta; None when the key is not a hash.
    meta: Option<Vec<(String, String)>>,
    /// ZRANGE ... WITHSCORES of queue and expiry; None when not a sorted set.
    queue: Option<Vec<(String, String)>>,
    expiry: Option<Vec<(String, String)>>,
}

async fn read(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &[String; 3],
) -> redis::RedisResult<Snapshot> {
    let [meta, queue, expiry] = keys;
    let mut pipe = redis::pipe();
    pipe.atomic().ignore_errors().cmd("TIME");
    for key in keys {
        pipe.cmd("TYPE").arg(key);
    }
    for key in keys {
        pipe.cmd("PTTL").arg(key);
    }
    pipe.cmd("HGETALL").arg(meta);
    for key in [queue, expiry] {
        pipe.cmd("ZRANGE").arg(key).arg(0).arg(-1).arg("WITHSCORES");
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    let [time, t1, t2, t3, p1, p2, p3, hash, q, e] = <[Value; 10]>::try_from(replies)
        .map_err(|r| unexpected(format!("{} replies to 10 commands", r.len())))?;
    let now_ms = match ok(time)? {
        Value::Array(parts) if parts.len() == 2 => {
            let secs: i64 = parse(&parts[0], "TIME")?;
            let micros: i64 = parse(&parts[1], "TIME")?;
            secs * 1000 + micros / 1000
        }
        other => return Err(unexpected(format!("TIME replied {other:?}"))),
    };
    let types = [ok(t1)?, ok(t2)?, ok(t3)?].map(|v| text(&v).unwrap_or_default());
    let pttls = [
        parse(&ok(p1)?, "PTTL")?,
        parse(&ok(p2)?, "PTTL")?,
        parse(&ok(p3)?, "PTTL")?,
    ];
    // A key of another type makes its read fail; TYPE says so already.
    let pairs_of = |v: Value| match v {
        Value::ServerError(_) => None,
        v => pairs(v),
    };
    Ok(Snapshot {
        now_ms,
        types,
        pttls,
        meta: pairs_of(hash),
        queue: pairs_of(q),
        expiry: pairs_of(e),
    })
}

fn ok(value: Value) -> redis::RedisResult<Value> {
    match value {
        Value::ServerError(e) => Err(e.into()),
        v => Ok(v),
    }
}

fn unexpected(detail: String) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        detail,
    ))
}

fn parse<T: std::str::FromStr>(value: &Value, what: &str) -> redis::RedisResult<T> {
    text(value)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| unexpected(format!("{what} replied {value:?}")))
}

/// A scalar reply as text (RESP2 or RESP3).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        Value::Int(n) => Some(n.to_string()),
        Value::Double(d) => Some(if d.fract() == 0.0 && d.abs() < 9.0e15 {
            format!("{}", *d as i64)
        } else {
            d.to_string()
        }),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// HGETALL or ZRANGE WITHSCORES as pairs: a flat array (RESP2), an array of
/// pairs or a map (RESP3).
fn pairs(value: Value) -> Option<Vec<(String, String)>> {
    match value {
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect(),
        Value::Array(items) if items.iter().all(|i| matches!(i, Value::Array(_))) => items
            .iter()
            .map(|item| match item {
                Value::Array(pair) if pair.len() == 2 => Some((text(&pair[0])?, text(&pair[1])?)),
                _ => None,
            })
            .collect(),
        Value::Array(items) if items.len() % 2 == 0 => items
            .chunks_exact(2)
            .map(|pair| Some((text(&pair[0])?, text(&pair[1])?)))
            .collect(),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

/// A sorted-set score (ms or a ticket number) as an integer.
fn score(text: &str) -> Option<i64> {
    let value: f64 = text.parse().ok()?;
    (value.is_finite() && value.fract() == 0.0 && value.abs() < 9.0e15).then_some(value as i64)
}

impl Report {
    fn new(cid: &str, url: &str, keys: &[String; 3], snap: Snapshot) -> Report {
        let mut problems = Vec::new();
        let wanted = ["hash", "zset", "zset"];
        for ((key, kind), want) in keys.iter().zip(&snap.types).zip(wanted) {
            if kind != "none" && kind != want {
                problems.push(format!(
                    "key {} holds a {kind}, expected a {want}",
                    shown(key)
                ));
            }
        }
        for ((key, kind), pttl) in keys.iter().zip(&snap.types).zip(snap.pttls) {
            if kind != "none" && pttl == -1 {
                problems.push(format!("key {} has no expiry", shown(key)));
            }
        }

        let meta: BTreeMap<String, String> = snap.meta.unwrap_or_default().into_iter().collect();
        let field = |name: &str| meta.get(name).and_then(|v| v.trim().parse::<u64>().ok());
        for name in ["next", "epoch", "served", "served_at", "fence", "held"] {
            if meta.contains_key(name) && field(name).is_none() {
                problems.push(format!("meta field {name} is not a number"));
            }
        }
        let epoch = field("epoch");
        let exists = epoch.is_some();

        // Expiry per ticket.
        let mut expiries: BTreeMap<u64, i64> = BTreeMap::new();
        for (member, at) in snap.expiry.unwrap_or_default() {
            match (member.parse::<u64>(), score(&at)) {
                (Ok(n), Some(at)) => {
                    expiries.insert(n, at);
                }
                _ => problems.push(format!(
                    "expiry set member {member:?} (score {at}) is not a ticket"
                )),
            }
        }
        // Queue order: by score, which is the number.
        let mut numbers = Vec::new();
        for (member, s) in snap.queue.unwrap_or_default() {
            match member.parse::<u64>() {
                Ok(n) if score(&s) == i64::try_from(n).ok() => numbers.push(n),
                _ => problems.push(format!(
                    "queue member {member:?} (score {s}) is not a ticket"
                )),
            }
        }
        let queued: BTreeSet<u64> = numbers.iter().copied().collect();
        for n in expiries.keys().filter(|n| !queued.contains(n)) {
            problems.push(format!("ticket {n} has an expiry but is not queued"));
        }
        if !exists && (!numbers.is_empty() || !expiries.is_empty()) {
            problems.push("tickets are queued but the meta hash has no epoch".into());
        }

        let now = snap.now_ms;
        let live = |n: &u64| expiries.get(n).is_some_and(|&at| at >= now);
        let now_serving = numbers.iter().copied().find(live);
        let granted = now_serving.is_some() && field("served") == now_serving;
        let held = granted && field("held") == now_serving;
        let served = now_serving.map(|ticket| Served {
            ticket,
            granted,
            fence: field("fence").filter(|_| granted),
            held,
            granted_ms_ago: field("served_at")
                .filter(|_| granted)
                .and_then(|at| i64::try_from(at).ok())
                .map(|at| now - at),
        });

        let mut tickets = Vec::with_capacity(numbers.len());
        for (position, &number) in numbers.iter().enumerate() {
            let terms = meta.get(&format!("l{number}")).map(|t| {
                let mut parts = t.split(' ').map(|p| p.parse::<u64>().ok());
                (parts.next().flatten(), parts.next().flatten())
            });
            let expires_at = expiries.get(&number).copied();
            if expires_at.is_none() {
                problems.push(format!("ticket {number} is queued without an expiry"));
            }
            let state = if Some(number) == now_serving {
                "served"
            } else if live(&number) {
                "waiting"
            } else {
                "expired"
            };
            let deadline = match (terms.is_some(), state) {
                (false, _) => "lifetime",
                (true, "served") if held => "lease",
                (true, "served") if granted => "pick-up",
                _ => "check-in",
            };
            tickets.push(TicketRow {
                position,
                number,
                state,
                remaining_ms: expires_at.map(|at| at - now),
                expires_at_ms: expires_at,
                kind: if terms.is_some() { "renewing" } else { "fixed" },
                lease_ms: terms.and_then(|t| t.0),
                liveness_ms: terms.and_then(|t| t.1),
                deadline,
            });
        }
        let depth = tickets.iter().filter(|t| t.state != "expired").count();

        let [meta_key, queue_key, expiry_key] = keys.clone();
        let [meta_type, queue_type, expiry_type] = snap.types;
        let [meta_pttl, queue_pttl, expiry_pttl] = snap.pttls;
        Report {
            exists,
            conversation_id: cid.to_owned(),
            redis: redact_url(url),
            redis_time_ms: now,
            epoch,
            next: field("next"),
            depth,
            expired: tickets.len() - depth,
            served,
            last_fence: field("fence"),
            tickets,
            keys: Keys {
                meta: KeyInfo {
                    name: meta_key,
                    kind: meta_type,
                    pttl_ms: meta_pttl,
                },
                queue: KeyInfo {
                    name: queue_key,
                    kind: queue_type,
                    pttl_ms: queue_pttl,
                },
                expiry: KeyInfo {
                    name: expiry_key,
                    kind: expiry_type,
                    pttl_ms: expiry_pttl,
                },
            },
            meta,
            problems,
        }
    }

    /// The human form.
    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "conversation  {}", shown(&self.conversation_id));
        let _ = writeln!(out, "redis         {}", self.redis);
        if !self.exists {
            let _ = writeln!(
                out,
                "no record: the conversation has no queue (key {} does not exist)",
                shown(&self.keys.meta.name)
            );
        } else {
            let _ = writeln!(
                out,
                "record        epoch {}, next ticket {}",
                opt(self.epoch),
                opt(self.next)
            );
            let mut depth = format!("{} live ticket(s)", self.depth);
            if self.expired > 0 {
                depth.push_str(&format!(
                    ", {} expired (pruned by the next operation)",
                    self.expired
                ));
            }
            let _ = writeln!(out, "depth         {depth}");
            let served = match &self.served {
                None => "nobody (no live ticket)".to_owned(),
                Some(s) if !s.granted => format!(
                    "ticket {}, not granted yet (the holder's ticket expired; the next operation grants it)",
                    s.ticket
                ),
                Some(s) => format!(
                    "ticket {}, fencing token {}, {}, granted {} ago",
                    s.ticket,
                    opt(s.fence),
                    if s.held {
                        "picked up (held)"
                    } else {
                        "not picked up yet"
                    },
                    s.granted_ms_ago.map_or("?".into(), ms)
                ),
            };
            let _ = writeln!(out, "served        {served}");
        }
        if !self.tickets.is_empty() {
            out.push('\n');
            let mut rows = vec![[
                "pos".to_owned(),
                "ticket".to_owned(),
                "state".to_owned(),
                "expires in".to_owned(),
                "deadline".to_owned(),
                "kind".to_owned(),
            ]];
            for t in &self.tickets {
                let kind = match (t.lease_ms, t.liveness_ms) {
                    (Some(lease), Some(liveness)) => format!(
                        "renewing (lease {}, liveness {})",
                        ms(lease as i64),
                        ms(liveness as i64)
                    ),
                    _ if t.kind == "renewing" => "renewing (unreadable terms)".to_owned(),
                    _ => "fixed".to_owned(),
                };
                rows.push([
                    t.position.to_string(),
                    t.number.to_string(),
                    t.state.to_owned(),
                    match t.remaining_ms {
                        None => "no expiry".into(),
                        Some(left) if left < 0 => format!("{} ago", ms(-left)),
                        Some(left) => ms(left),
                    },
                    t.deadline.to_owned(),
                    kind,
                ]);
            }
            columns(&mut out, &rows, &[true, true, false, true, false, false]);
        }
        out.push('\n');
        let mut rows = vec![["key".to_owned(), "type".to_owned(), "pttl".to_owned()]];
        for key in [&self.keys.meta, &self.keys.queue, &self.keys.expiry] {
            let pttl = match key.pttl_ms {
                -2 => "-".to_owned(),
                -1 => "no expiry".to_owned(),
                n => ms(n),
            };
            rows.push([shown(&key.name), key.kind.clone(), pttl]);
        }
        columns(&mut out, &rows, &[false, false, true]);
        for problem in &self.problems {
            let _ = writeln!(out, "problem: {problem}");
        }
        out
    }
}

/// Rows as aligned columns; `right[i]` right-aligns column i.
fn columns<const N: usize>(out: &mut String, rows: &[[String; N]], right: &[bool; N]) {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i > 0 {
                line.push_str("  ");
            }
            if right[i] {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < N {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn ms(n: i64) -> String {
    format!("{n} ms")
}

fn opt(n: Option<u64>) -> String {
    n.map_or("-".into(), |n| n.to_string())
}

/// Ids and key names may hold anything (newlines, escapes): shown escaped,
/// so a hostile id cannot forge output lines. Non-ASCII letters stay as they are.
fn shown(text: &str) -> String {
    text.chars().flat_map(char::escape_debug).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_of_both_protocols_become_pairs() {
        let flat = Value::Array(vec![
            Value::BulkString(b"0".to_vec()),
            Value::BulkString(b"17".to_vec()),
        ]);
        let nested = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"0".to_vec()),
            Value::Double(17.0),
        ])]);
        let map = Value::Map(vec![(
            Value::BulkString(b"0".to_vec()),
            Value::BulkString(b"17".to_vec()),
        )]);
        for v in [flat, nested, map] {
            assert_eq!(pairs(v), Some(vec![("0".into(), "17".into())]));
        }
        assert_eq!(score("1795678927228"), Some(1_795_678_927_228));
        assert_eq!(score("1.5"), None);
    }
}
