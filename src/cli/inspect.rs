//! `ticketlock inspect`: one conversation's queue as the store sees it.
//!
//! What an operator runs when a conversation seems stuck. It asks the store
//! through `lua/inspect.lua` (read-only, so it works on a replica, under the
//! README's ACL user and on a Redis that is out of memory); every rule it
//! shows (liveness, grants, pick-ups) is the scripts' own, decoded once by
//! the library, never re-derived here.

use std::fmt::Write as _;
use std::process::ExitCode;

use serde::Serialize;
use ticketlock::{Inspection, LockError, LockStore};

use ticketlock::__cli::shown;

use super::connect::required_config;
use super::{print_error, print_json, print_out, store_error, CliError, StoreArgs, EXIT_CODES};

/// Arguments of `ticketlock inspect`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES)]
pub(crate) struct InspectArgs {
    /// The conversation id (1 to 1024 bytes; any characters).
    #[arg(value_name = "CONVERSATION_ID")]
    conversation_id: String,

    #[command(flatten)]
    store: StoreArgs,

    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// The whole report; `--json` prints it as is.
#[derive(Debug, Serialize)]
struct Report {
    /// The conversation has a record.
    exists: bool,
    conversation_id: String,
    redis: String,
    epoch: Option<u64>,
    /// The number the next ticket gets.
    next: Option<u64>,
    /// Live tickets.
    depth: u64,
    /// Tickets past their expiry that no operation has dropped yet.
    expired: u64,
    /// The lowest live ticket: the one the lock belongs to.
    served: Option<Served>,
    /// The fencing token of the last grant (tokens only grow).
    last_fence: Option<u64>,
    /// Every ticket in serving order, expired ones included.
    tickets: Vec<TicketRow>,
    key: KeyInfo,
    /// Request ids cancelled before their issue ran, still remembered.
    cancelled_requests: u64,
    /// Foreign data the store refused to read; non-empty means exit code 1.
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Served {
    ticket: u64,
    /// The store granted it; false while a grant is due (the ticket granted
    /// before expired or left, and nothing ran since).
    granted: bool,
    /// The grant's fencing token.
    fence: Option<u64>,
    /// Its owner picked the grant up.
    held: bool,
    granted_ms_ago: Option<u64>,
}

#[derive(Debug, Serialize)]
struct TicketRow {
    position: usize,
    number: u64,
    /// `served`, `waiting` or `expired`.
    state: &'static str,
    /// ms until it expires (negative: expired that long ago).
    remaining_ms: i64,
    /// `renewing` (taken by `lock`) or `fixed` (`issue_ticket`).
    kind: &'static str,
    lease_ms: Option<u64>,
    liveness_ms: Option<u64>,
    /// What its expiry is: `lifetime` (fixed), `lease` (held), `pick-up`
    /// (granted, not yet picked up), `check-in` (a waiter's liveness).
    deadline: &'static str,
    request: Option<String>,
}

#[derive(Debug, Serialize)]
struct KeyInfo {
    name: String,
    /// ms to live; none without a key.
    pttl_ms: Option<u64>,
}

/// Runs `ticketlock inspect`.
pub(crate) async fn run(args: InspectArgs) -> Result<ExitCode, CliError> {
    let cid = &args.conversation_id;
    // The library validates the id and derives the key, as the scripts expect it.
    let [key] = ticketlock::conversation_keys(args.store.key_prefix.as_deref(), cid)
        .map_err(|e| CliError::usage(e.to_string()))?;
    let mut config = required_config(args.store.redis.as_deref(), "inspect")?;
    config.key_prefix = args.store.key_prefix.clone();
    let url = config.to_string();
    let store = LockStore::create(Some(&config))
        .await
        .map_err(|e| store_error(&config, e))?;
    let (inspection, problems) = match store.inspect(cid).await {
        Ok(inspection) => (Some(inspection), Vec::new()),
        Err(LockError::Corrupted { detail, .. }) => (None, vec![detail]),
        Err(e) => return Err(CliError::store(format!("cannot read from {url}: {e}"))),
    };
    tracing::debug!(key = %key, ?inspection, ?problems, "snapshot read");
    let report = Report::new(cid, url, key, inspection.as_ref(), problems);
    if args.json {
        print_json(&report, "report")?;
    } else {
        print_out(&report.table());
    }
    if report.problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        print_error(&format!(
            "conversation {} holds foreign data: {}",
            shown(cid),
            report.problems.join("; ")
        ));
        Ok(ExitCode::FAILURE)
    }
}

impl Report {
    fn new(
        cid: &str,
        redis: String,
        key: String,
        inspection: Option<&Inspection>,
        problems: Vec<String>,
    ) -> Report {
        let record = inspection.and_then(|i| i.record.as_ref());
        let served = record.and_then(|r| {
            let head = r.head?;
            let granted = r.served == Some(head);
            Some(Served {
                ticket: head,
                granted,
                fence: r.fence.filter(|_| granted),
                held: granted && r.granted_ago.is_none(),
                granted_ms_ago: r
                    .granted_ago
                    .filter(|_| granted)
                    .map(|d| d.as_millis() as u64),
            })
        });
        let tickets = record.map_or(Vec::new(), |r| {
            r.tickets
                .iter()
                .enumerate()
                .map(|(position, t)| {
                    let state = if t.remaining_ms < 0 {
                        "expired"
                    } else if Some(t.number) == r.head {
                        "served"
                    } else {
                        "waiting"
                    };
                    let renewing = t.lease.is_some();
                    let deadline = match (renewing, &served) {
                        (false, _) => "lifetime",
                        (true, Some(s)) if s.ticket == t.number && s.held => "lease",
                        (true, Some(s)) if s.ticket == t.number && s.granted => "pick-up",
                        _ => "check-in",
                    };
                    TicketRow {
                        position,
                        number: t.number,
                        state,
                        remaining_ms: t.remaining_ms,
                        kind: if renewing { "renewing" } else { "fixed" },
                        lease_ms: t.lease.map(|d| d.as_millis() as u64),
                        liveness_ms: t.dead_waiter_timeout.map(|d| d.as_millis() as u64),
                        deadline,
                        request: t.request.clone(),
                    }
                })
                .collect()
        });
        Report {
            exists: record.is_some(),
            conversation_id: cid.to_owned(),
            redis,
            epoch: record.map(|r| r.epoch),
            next: record.map(|r| r.next),
            depth: record.map_or(0, |r| r.live),
            expired: record.map_or(0, |r| r.expired),
            served,
            last_fence: record.and_then(|r| r.fence),
            tickets,
            key: KeyInfo {
                name: key,
                pttl_ms: inspection.and_then(|i| i.ttl).map(|d| d.as_millis() as u64),
            },
            cancelled_requests: inspection.map_or(0, |i| i.cancelled_requests),
            problems,
        }
    }

    /// The human form.
    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "conversation  {}", shown(&self.conversation_id));
        let _ = writeln!(out, "redis         {}", self.redis);
        let ttl = self.key.pttl_ms.map_or("no key".to_owned(), |t| {
            format!("expires in {}", ms(t as i64))
        });
        let _ = writeln!(out, "key           {} ({ttl})", shown(&self.key.name));
        if self.cancelled_requests > 0 {
            let _ = writeln!(
                out,
                "cancelled     {} request(s) whose issue has not arrived",
                self.cancelled_requests
            );
        }
        for problem in &self.problems {
            let _ = writeln!(out, "problem       {problem}");
        }
        if !self.exists {
            if self.problems.is_empty() {
                let _ = writeln!(out, "no record: the conversation has no queue");
            }
            return out;
        }
        let _ = writeln!(
            out,
            "record        epoch {}, next ticket {}",
            opt(self.epoch),
            opt(self.next)
        );
        let mut depth = format!("{} live ticket(s)", self.depth);
        if self.expired > 0 {
            depth.push_str(&format!(
                ", {} expired (dropped by the next operation that meets them)",
                self.expired
            ));
        }
        let _ = writeln!(out, "depth         {depth}");
        let served = match &self.served {
            None => "nobody (no live ticket)".to_owned(),
            Some(s) if !s.granted => format!(
                "ticket {}, not granted yet (the ticket granted before expired or left; the next operation grants it)",
                s.ticket
            ),
            Some(s) => format!(
                "ticket {}, fencing token {}, {}",
                s.ticket,
                opt(s.fence),
                match s.granted_ms_ago {
                    Some(ago) => format!("granted {} ago, not picked up yet", ms(ago as i64)),
                    None => "picked up (held)".to_owned(),
                }
            ),
        };
        let _ = writeln!(out, "served        {served}");
        if self.tickets.is_empty() {
            return out;
        }
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
                _ => "fixed".to_owned(),
            };
            rows.push([
                t.position.to_string(),
                t.number.to_string(),
                t.state.to_owned(),
                if t.remaining_ms < 0 {
                    format!("{} ago", ms(-t.remaining_ms))
                } else {
                    ms(t.remaining_ms)
                },
                t.deadline.to_owned(),
                kind,
            ]);
        }
        columns(&mut out, &rows, &[true, true, false, true, false, false]);
        out
    }
}

fn opt(n: Option<u64>) -> String {
    n.map_or("-".into(), |n| n.to_string())
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
