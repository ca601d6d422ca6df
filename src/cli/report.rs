//! Samples gathered by the handlers, the checks run on the outcome, and the summary.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::state::Outcome;

/// What the handlers of one process measured. A child process prints it as
/// one JSON line on stdout; the parent merges them.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Samples {
    /// Critical sections completed.
    pub(crate) handled: u64,
    /// Lock errors (and failures of the probes themselves).
    pub(crate) errors: u64,
    /// Critical sections that found another one of the same conversation running.
    pub(crate) overlaps: u64,
    /// The first error's message.
    pub(crate) first_error: Option<String>,
    /// The first failure of the store itself (Redis unreachable, stalled,
    /// refusing): the run stopped there, and nothing it measured counts.
    #[serde(default)]
    pub(crate) store_failure: Option<String>,
    /// From calling `lock_with` to holding the lock, ns.
    pub(crate) wait_ns: Vec<u64>,
    /// From the previous holder starting to release to this waiter holding
    /// the lock, ns (only for waiters that were queued at that moment).
    pub(crate) handoff_ns: Vec<u64>,
}

impl Samples {
    pub(crate) fn error(&mut self, message: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(message);
        }
    }

    pub(crate) fn store_failed(&mut self, message: String) {
        if self.store_failure.is_none() {
            self.store_failure = Some(message);
        }
    }

    pub(crate) fn merge(&mut self, other: Samples) {
        if self.store_failure.is_none() {
            self.store_failure = other.store_failure;
        }
        self.handled += other.handled;
        self.errors += other.errors;
        self.overlaps += other.overlaps;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.wait_ns.extend(other.wait_ns);
        self.handoff_ns.extend(other.handoff_ns);
    }
}

/// Order check of one conversation's grant log.
///
/// Ticket numbers restart at 0 when a conversation's queue empties (the
/// record is deleted on the last release), so the log is a sequence of
/// epochs. Within each, tickets must be granted as 0, 1, 2, ... : strictly
/// increasing and without gaps, i.e. exactly the sorted tickets issued, so the
/// handling order is the ticket order. Every entry that is neither 0 (a new
/// epoch) nor the previous ticket + 1 is one violation.
pub(crate) fn order_check(grants: &[u64]) -> (u64, u64) {
    let mut violations = 0;
    let mut epochs = 0;
    let mut previous: Option<u64> = None;
    for &ticket in grants {
        if ticket == 0 {
            epochs += 1;
        } else if previous.map(|p| p + 1) != Some(ticket) {
            violations += 1;
        }
        previous = Some(ticket);
    }
    (violations, epochs)
}

/// p50 / p99 / max of a set of samples, in milliseconds.
#[derive(Debug, Serialize)]
pub(crate) struct Latency {
    /// How many were measured; the figures are `None` without any.
    pub(crate) samples: usize,
    pub(crate) p50: Option<f64>,
    pub(crate) p99: Option<f64>,
    pub(crate) max: Option<f64>,
}

impl Latency {
    fn of(mut ns: Vec<u64>) -> Self {
        ns.sort_unstable();
        // Nearest rank.
        let rank = |q: f64| -> Option<f64> {
            if ns.is_empty() {
                return None;
            }
            let i = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len()) - 1;
            Some(ms(ns[i]))
        };
        Latency {
            samples: ns.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: ns.last().map(|&n| ms(n)),
        }
    }

    fn show(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
        format!(
            "p50 {}  p99 {}  max {}  ({} samples)",
            f(self.p50),
            f(self.p99),
            f(self.max),
            self.samples
        )
    }
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1_000.0).round() / 1_000.0
}

/// The run's parameters, echoed in the summary.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Setup {
    /// Names this run's conversations (`sim-<run id>-<n>`) and probe keys (`sim:<run id>:...`).
    pub(crate) run_id: String,
    /// `redis` or `memory`.
    pub(crate) backend: &'static str,
    /// The Redis URL, password redacted; `None` in memory.
    pub(crate) redis: Option<String>,
    /// `--key-prefix`, if given.
    pub(crate) key_prefix: Option<String>,
    /// Bot instances (`--processes`), each a process of its own above 1.
    pub(crate) processes: u32,
    /// Handler tasks per process (`--workers`).
    pub(crate) workers: u32,
    pub(crate) conversations: u32,
    pub(crate) messages_per_conversation: u32,
    /// Time spent inside each critical section (`--hold`).
    pub(crate) hold_ms: u64,
    /// The lease each lock was taken with.
    pub(crate) lifetime_s: f64,
}

/// Everything `simulate` reports (`--json` prints exactly this).
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    /// Every message handled once, in order, alone, and without an error.
    pub(crate) ok: bool,
    /// Messages sent: conversations times messages per conversation.
    pub(crate) messages: u64,
    /// Critical sections completed.
    pub(crate) handled: u64,
    /// Grants that did not follow the previous ticket of their conversation.
    pub(crate) order_violations: u64,
    /// Critical sections that found another one of the same conversation running.
    pub(crate) overlaps: u64,
    /// Increments of a conversation's counter that another handler overwrote.
    pub(crate) lost_updates: u64,
    /// Lock errors (and failures of the probes themselves).
    pub(crate) errors: u64,
    /// The first error's message.
    pub(crate) first_error: Option<String>,
    /// Wall time of the run.
    pub(crate) elapsed_s: f64,
    /// Messages handled per second of wall time.
    pub(crate) throughput_per_s: f64,
    /// From calling `lock_with` to holding the lock.
    pub(crate) wait_ms: Latency,
    /// From the previous holder starting to release to the next one holding.
    pub(crate) handoff_ms: Latency,
    /// Times a conversation's queue started afresh (ticket numbering back at 0).
    pub(crate) epochs: u64,
    #[serde(flatten)]
    pub(crate) setup: Setup,
}

impl Summary {
    pub(crate) fn new(
        setup: Setup,
        messages: u64,
        samples: Samples,
        outcomes: &[Outcome],
        elapsed_s: f64,
    ) -> Self {
        let mut order_violations = 0;
        let mut epochs = 0;
        let mut lost_updates = 0;
        let mut handled = 0;
        for outcome in outcomes {
            let (violations, e) = order_check(&outcome.grants);
            order_violations += violations;
            epochs += e;
            let done = outcome.grants.len() as u64;
            handled += done;
            // Every completed critical section incremented the counter once.
            lost_updates += done.abs_diff(outcome.counter);
        }
        let ok = order_violations == 0
            && samples.overlaps == 0
            && lost_updates == 0
            && samples.errors == 0
            && handled == messages;
        Summary {
            ok,
            messages,
            handled,
            order_violations,
            overlaps: samples.overlaps,
            lost_updates,
            errors: samples.errors,
            first_error: samples.first_error,
            elapsed_s: (elapsed_s * 1000.0).round() / 1000.0,
            throughput_per_s: if elapsed_s > 0.0 {
                (handled as f64 / elapsed_s * 10.0).round() / 10.0
            } else {
                0.0
            },
            wait_ms: Latency::of(samples.wait_ns),
            handoff_ms: Latency::of(samples.handoff_ns),
            epochs,
            setup,
        }
    }

    /// The human-readable table (stdout).
    pub(crate) fn table(&self) -> String {
        let s = &self.setup;
        let mut out = String::new();
        let backend = match (&s.redis, &s.key_prefix) {
            (Some(url), Some(prefix)) => format!("redis {url}, key prefix {prefix}"),
            (Some(url), None) => format!("redis {url}"),
            _ => "in memory".to_owned(),
        };
        let _ = writeln!(
            out,
            "ticketlock simulate: {backend}; {} process(es) x {} workers; {} conversation(s) x {} messages; hold {} ms; lifetime {} s",
            s.processes, s.workers, s.conversations, s.messages_per_conversation, s.hold_ms, s.lifetime_s
        );
        let mut row = |name: &str, value: String| {
            let _ = writeln!(out, "  {name:<24}{value}");
        };
        row(
            "messages handled",
            format!("{} / {}", self.handled, self.messages),
        );
        row("order violations", self.order_violations.to_string());
        row("overlapping sections", self.overlaps.to_string());
        row("lost updates", self.lost_updates.to_string());
        row("lock errors", self.errors.to_string());
        row("elapsed", format!("{:.3} s", self.elapsed_s));
        row("throughput", format!("{:.1} msgs/s", self.throughput_per_s));
        row("wait time (ms)", self.wait_ms.show());
        row("hand-off latency (ms)", self.handoff_ms.show());
        row("queue epochs", self.epochs.to_string());
        row(
            "result",
            if self.ok {
                "OK: FIFO order and mutual exclusion held".to_owned()
            } else {
                "FAILED: an invariant broke".to_owned()
            },
        );
        out
    }

    /// One line for stderr when an invariant broke.
    pub(crate) fn failure_line(&self) -> String {
        let mut line = format!(
            "invariant broken: {} order violation(s), {} overlap(s), {} lost update(s), {} lock error(s), {} of {} messages handled",
            self.order_violations, self.overlaps, self.lost_updates, self.errors, self.handled, self.messages
        );
        if let Some(e) = &self.first_error {
            let _ = write!(line, "; first error: {e}");
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_check_accepts_fifo_epochs_only() {
        assert_eq!(order_check(&[0, 1, 2, 3]), (0, 1));
        assert_eq!(order_check(&[0, 1, 0, 0, 1, 2]), (0, 3));
        assert_eq!(order_check(&[0, 2, 1]), (2, 1));
        assert_eq!(order_check(&[0, 1, 3]), (1, 1));
        assert_eq!(order_check(&[1, 2]), (1, 0));
        assert_eq!(order_check(&[]), (0, 0));
    }

    #[test]
    fn latency_uses_nearest_rank() {
        let l = Latency::of((1..=100).map(|i| i * 1_000_000).collect());
        assert_eq!((l.p50, l.p99, l.max), (Some(50.0), Some(99.0), Some(100.0)));
        assert_eq!(Latency::of(vec![]).p50, None);
    }
}
