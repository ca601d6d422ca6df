//! Argument parsing, logging set-up, errors and exit codes of the binary.

mod children;
mod connect;
mod handlers;
mod inspect;
mod plan;
mod report;
mod scripts;
mod simulate;
mod state;

use std::fmt;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use ticketlock::{LockError, StoreConfig, StoreType};

/// Exit codes, shown at the end of `--help`.
pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0    done; simulate: every invariant held (FIFO order, mutual exclusion, no lost
       update, no lock error)
  1    simulate: an invariant broke (order violations, overlaps, lost updates, or lock
       errors that are not the store failing); inspect: the conversation's keys hold foreign or inconsistent
       data; scripts load: Redis computed another SHA1 than ticketlock
  2    bad arguments or configuration (one line on stderr): a usage error, an invalid
       conversation id or key prefix, an invalid TICKET_LOCK_LIFETIME, no --redis
       where one is needed
  3    the store could not be created, reached or used (unreachable, stalled or
       failing Redis; malformed or unsupported URL), or a child process failed
  130  interrupted (SIGINT, Ctrl-C); simulate first removes its run's keys
  143  terminated (SIGTERM); simulate first removes its run's keys";

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
    Simulate(plan::SimulateArgs),
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
    pub(crate) const TERMINATED: u8 = 143;

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

    /// SIGINT, Ctrl-C (exit 130).
    pub(crate) fn interrupted() -> Self {
        CliError {
            code: Self::INTERRUPTED,
            message: "interrupted".into(),
        }
    }

    /// SIGTERM (exit 143).
    pub(crate) fn terminated() -> Self {
        CliError {
            code: Self::TERMINATED,
            message: "terminated".into(),
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

/// Where the lock's keys are, as every subcommand that reads or writes
/// them takes it.
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// Redis: redis://[user:password@]host[:port][/db], rediss://... (TLS),
    /// redis+cluster://..., redis+sentinel://... ; simulate runs in memory
    /// without it (or with an empty value, or memory://).
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    pub(crate) redis: Option<String>,

    /// ASCII-alphanumeric prefix of the lock's keys (<PREFIX>:lock:...;
    /// default lock:...). Only with Redis.
    #[arg(long, value_name = "PREFIX")]
    pub(crate) key_prefix: Option<String>,
}

/// `--redis` / `REDIS_URL`, parsed by the library (the one URL grammar):
/// `None` for the in-memory store (no value, an empty one, or `memory://`).
/// A malformed or unsupported URL is exit 3, as documented; the error never
/// shows the URL's credentials.
pub(crate) fn redis_config(redis: Option<&str>) -> Result<Option<StoreConfig>, CliError> {
    let Some(url) = redis.filter(|url| !url.trim().is_empty()) else {
        // An empty REDIS_URL is an unset one.
        return Ok(None);
    };
    let config = StoreConfig::from_url(url).map_err(|e| CliError::store(e.to_string()))?;
    Ok((config.store_type == StoreType::Redis).then_some(config))
}

/// What creating a store failed with, as an exit code. A rejected setting
/// (TICKET_LOCK_LIFETIME, key prefix, socket timeout) is bad input: exit 2.
/// Everything about the address (a malformed or unsupported URL, as
/// documented, whatever part of it the library names) and every failure to
/// reach the server: exit 3.
pub(crate) fn store_error(config: &StoreConfig, error: LockError) -> CliError {
    match error {
        LockError::InvalidInput {
            what: "TICKET_LOCK_LIFETIME" | "key prefix" | "socket timeout" | "lifetime",
            ..
        } => CliError::usage(error.to_string()),
        // Already says what is wrong with the configuration.
        LockError::InvalidInput { .. } => CliError::store(error.to_string()),
        e => CliError::store(format!("cannot connect to {config}: {e}")),
    }
}

/// `ticketlock: <message>` on stderr; never panics (a closed stderr is ignored).
pub(crate) fn print_error(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "ticketlock: {message}");
}

/// `value` as one JSON line on stdout (`what` names it in the error).
pub(crate) fn print_json(value: &impl serde::Serialize, what: &str) -> Result<(), CliError> {
    let line = serde_json::to_string(value)
        .map_err(|e| CliError::store(format!("cannot encode the {what}: {e}")))?;
    print_out(&format!("{line}\n"));
    Ok(())
}

/// Writes `text` to stdout; a closed pipe is ignored.
pub(crate) fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Log output on stderr: ticketlock's warnings (and other crates' errors)
/// by default, so a failure stays one line even when redis-rs warns about
/// every node it could not reach; `warn,ticketlock=debug` with `-v`,
/// `debug,ticketlock=trace` with `-vv`; a non-empty `RUST_LOG` replaces all that.
pub(crate) fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            EnvFilter::builder().parse_lossy(directives)
        }
        _ => EnvFilter::new(match verbose {
            0 => "error,ticketlock=warn",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_are_parsed_by_the_library_and_shown_without_secrets() {
        for memory in [None, Some(""), Some("  "), Some("memory://")] {
            assert!(redis_config(memory).unwrap().is_none(), "{memory:?}");
        }
        let config = redis_config(Some("rediss://tok@h")).unwrap().unwrap();
        assert_eq!(config.to_string(), "rediss://<redacted>@h:6379/0");
        for bad in [
            "127.0.0.1:6379",
            "user:s3cret@127.0.0.1:6379",
            "redis//:s3cret@h",
        ] {
            let e = redis_config(Some(bad)).unwrap_err();
            assert_eq!(e.code, CliError::STORE);
            assert!(!e.message.contains("s3cret"), "{e}");
        }
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
