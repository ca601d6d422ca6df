//! Argument parsing, logging set-up, errors and exit codes of the binary.

mod children;
mod connect;
mod inspect;
mod report;
mod scripts;
mod simulate;
mod state;

use std::fmt;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use ticketlock::LockError;

/// Exit codes, shown at the end of `--help`.
pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0    done; simulate: every invariant held (FIFO order, mutual exclusion, no lost
       update, no lock error)
  1    simulate: an invariant broke (order violations, overlaps, lost updates or lock
       errors > 0); inspect: the conversation's keys hold foreign or inconsistent
       data; scripts load: Redis computed another SHA1 than ticketlock
  2    bad arguments or configuration (one line on stderr): a usage error, an invalid
       conversation id or key prefix, an invalid TICKET_LOCK_LIFETIME, no --redis
       where one is needed
  3    the store could not be created or reached (unreachable Redis, malformed or
       unsupported URL), or a child process failed
  130  interrupted (Ctrl-C)";

/// Strictly FIFO, expiring per-conversation ticket locks over Redis or in memory.
#[derive(Debug, Parser)]
#[command(name = "ticketlock", version, about, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    /// More log output on stderr (-v: ticketlock=debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Play a multi-instance chatbot fleet against the lock and check that
    /// every conversation's messages are handled one at a time, in ticket order.
    Simulate(simulate::SimulateArgs),
    /// Show one conversation's queue in Redis as it stands (read-only): every
    /// ticket in serving order, who is served, its fencing token, the keys' TTLs.
    Inspect(inspect::InspectArgs),
    /// Print the Lua scripts (and their SHA1s) or load them into Redis, for
    /// clients in other languages.
    Scripts(scripts::ScriptsArgs),
}

impl Cli {
    /// Parses the command line. Help and version exit 0 (printed by clap);
    /// every usage error is one line on stderr and exit code 2.
    pub(crate) fn parse_args() -> Result<Cli, ExitCode> {
        match Cli::try_parse() {
            Ok(cli) => Ok(cli),
            Err(e) => match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    Err(if e.use_stderr() {
                        ExitCode::from(CliError::USAGE)
                    } else {
                        ExitCode::SUCCESS
                    })
                }
                _ => {
                    print_error(&format!("{} (see --help)", one_line(&e.to_string())));
                    Err(ExitCode::from(CliError::USAGE))
                }
            },
        }
    }

    /// Runs the chosen subcommand.
    pub(crate) async fn run(self) -> Result<ExitCode, CliError> {
        match self.command {
            Command::Simulate(args) => simulate::run(args, self.verbose).await,
            Command::Inspect(args) => inspect::run(args).await,
            Command::Scripts(args) => scripts::run(args).await,
        }
    }
}

/// clap's multi-line message as one line: its first paragraph, without the
/// `error: ` label.
fn one_line(rendered: &str) -> String {
    let paragraph: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let text = paragraph.join(" ");
    text.strip_prefix("error: ").unwrap_or(&text).to_owned()
}

/// A failure that ends the program with a message and an exit code other than 0 or 1.
#[derive(Debug)]
pub(crate) struct CliError {
    code: u8,
    message: String,
}

impl CliError {
    pub(crate) const USAGE: u8 = 2;
    pub(crate) const STORE: u8 = 3;
    pub(crate) const INTERRUPTED: u8 = 130;

    /// Bad arguments (exit 2).
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: Self::USAGE,
            message: message.into(),
        }
    }

    /// The store or a child process failed (exit 3).
    pub(crate) fn store(message: impl Into<String>) -> Self {
        CliError {
            code: Self::STORE,
            message: message.into(),
        }
    }

    /// Ctrl-C (exit 130).
    pub(crate) fn interrupted() -> Self {
        CliError {
            code: Self::INTERRUPTED,
            message: "interrupted".into(),
        }
    }

    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Always exactly one line.
        f.write_str(&self.message.replace(['\r', '\n'], " "))
    }
}

/// What creating a store failed with, as an exit code. A rejected setting
/// (TICKET_LOCK_LIFETIME, key prefix, socket timeout) is bad input: exit 2.
/// Everything about the address (a malformed or unsupported URL, as
/// documented, whatever part of it the library names) and every failure to
/// reach the server: exit 3.
pub(crate) fn store_error(url: &str, error: LockError) -> CliError {
    match error {
        LockError::InvalidInput {
            what: "TICKET_LOCK_LIFETIME" | "key prefix" | "socket timeout" | "lifetime",
            ..
        } => CliError::usage(error.to_string()),
        // Already names the (redacted) URL and what is wrong with it.
        LockError::InvalidInput { .. } => CliError::store(error.to_string()),
        e => CliError::store(format!("cannot connect to {}: {e}", redact_url(url))),
    }
}

/// `--key-prefix`: what the library accepts (it becomes `<PREFIX>:lock:`).
pub(crate) fn parse_prefix(text: &str) -> Result<String, String> {
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err("it must be non-empty and ASCII alphanumeric (A-Z, a-z, 0-9)".into());
    }
    Ok(text.to_owned())
}

/// An empty URL or `memory://` (the library's spellings) selects the in-memory store.
pub(crate) fn is_memory_url(url: &str) -> bool {
    matches!(
        url.trim(),
        "" | "memory" | "memory://" | "in_memory" | "in_memory://"
    )
}

/// `ticketlock: <message>` on stderr; never panics (a closed stderr is ignored).
pub(crate) fn print_error(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "ticketlock: {message}");
}

/// Writes `text` to stdout; a closed pipe is ignored.
pub(crate) fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Log output on stderr: warnings by default, `ticketlock=debug` with `-v`,
/// `ticketlock=trace,debug` with `-vv`; a non-empty `RUST_LOG` replaces all that.
pub(crate) fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            EnvFilter::builder().parse_lossy(directives)
        }
        _ => EnvFilter::new(match verbose {
            0 => "warn",
            1 => "warn,ticketlock=debug",
            _ => "debug,ticketlock=trace",
        }),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// A bug must still end with one line on stderr, not a backtrace.
pub(crate) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        print_error(&format!("internal error{place}: {what}"));
    }));
}

/// `user:password@` in a URL becomes `user:<redacted>@`, so a URL can be shown.
/// Everything up to the last `@` counts as credentials: when in doubt, hide more.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) if !user.contains('/') => {
                format!("{scheme}://{user}:<redacted>@{host}")
            }
            _ => format!("{scheme}://<redacted>@{host}"),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(
            redact_url("redis://u:pw@h:1/2"),
            "redis://u:<redacted>@h:1/2"
        );
        assert_eq!(redact_url("redis://:p@w@h"), "redis://:<redacted>@h");
        assert_eq!(redact_url("rediss://tok@h"), "rediss://<redacted>@h");
        assert_eq!(redact_url("redis://u:a/b@h"), "redis://u:<redacted>@h");
        assert_eq!(redact_url("http://x"), "http://x");
    }

    #[test]
    fn clap_errors_become_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  --x <X>\n\nUsage: t --x <X>\n";
        assert_eq!(
            one_line(rendered),
            "the following required arguments were not provided: --x <X>"
        );
    }
}
