//! `--processes P`: the parent starts P copies of this program, waits until
//! every one is connected, starts them together, and collects what they measured.
//!
//! Protocol on a child's stdout: `ready`, then (after the parent wrote `go`
//! on its stdin) one JSON line of [`Samples`]. A child's stderr is passed
//! through, except its `ticketlock: ...` error line, which the parent keeps to
//! report the failure in one line of its own.

use std::io::Write;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::handlers::{open_shared, open_store, run_handlers};
use super::plan::Plan;
use super::report::Samples;
use super::state::Shared;
use super::{print_json, print_out, CliError};

/// How long a child may take to connect before the run is called off.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a failed child gets to exit on its own before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// How often the parent's progress bar asks Redis.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// A running child process.
struct Worker {
    index: u32,
    process: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Passes stderr through; yields the child's last `ticketlock:` line.
    stderr: JoinHandle<Option<String>>,
}

impl Worker {
    fn spawn(plan: &Plan, index: u32) -> Result<Worker, CliError> {
        let exe = std::env::current_exe().map_err(|e| {
            CliError::store(format!(
                "cannot find this program to start child processes: {e}"
            ))
        })?;
        let mut command = Command::new(exe);
        command
            .args(child_args(plan, index))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Through the environment, so no password shows in the process list.
        match &plan.redis_url {
            Some(url) => command.env("REDIS_URL", url),
            None => command.env_remove("REDIS_URL"),
        };
        let mut process = command
            .spawn()
            .map_err(|e| CliError::store(format!("cannot start child process {index}: {e}")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (
            process.stdin.take(),
            process.stdout.take(),
            process.stderr.take(),
        ) else {
            return Err(CliError::store(format!(
                "child process {index} has no pipes"
            )));
        };
        let stderr = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut error = None;
            while let Ok(Some(line)) = lines.next_line().await {
                match line.strip_prefix("ticketlock: ") {
                    Some(message) => error = Some(message.to_owned()),
                    None => {
                        let _ = writeln!(std::io::stderr().lock(), "[child {index}] {line}");
                    }
                }
            }
            error
        });
        Ok(Worker {
            index,
            process,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout).lines(),
            stderr,
        })
    }

    /// Waits for `ready`.
    async fn ready(&mut self) -> Result<(), String> {
        match tokio::time::timeout(READY_TIMEOUT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) if line == "ready" => Ok(()),
            Ok(Ok(Some(line))) => Err(format!("said {line:?} instead of ready")),
            Ok(_) => Err("stopped before it was ready".into()),
            Err(_) => Err(format!("was not ready within {READY_TIMEOUT:?}")),
        }
    }

    async fn go(&mut self) -> Result<(), String> {
        let Some(mut stdin) = self.stdin.take() else {
            return Err("was started twice".into());
        };
        // Dropping stdin afterwards closes it; the child reads one line only.
        stdin
            .write_all(b"go\n")
            .await
            .map_err(|e| format!("could not be started: {e}"))
    }

    /// Reads the child's samples and waits for it to exit successfully.
    async fn finish(mut self) -> Result<Samples, String> {
        let line = match self.stdout.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => return Err(self.failure("stopped before reporting").await),
            Err(e) => return Err(self.failure(&format!("could not be read: {e}")).await),
        };
        let samples: Samples = match serde_json::from_str(&line) {
            Ok(samples) => samples,
            Err(e) => return Err(self.failure(&format!("reported garbage ({e})")).await),
        };
        match self.process.wait().await {
            Ok(status) if status.success() => Ok(samples),
            Ok(status) => Err(self.failure(&exit_text(status)).await),
            Err(e) => Err(self.failure(&format!("could not be waited for: {e}")).await),
        }
    }

    /// One line saying why this child failed: its own error line if it
    /// printed one, else `what` and how it exited.
    async fn failure(mut self, what: &str) -> String {
        let status = match tokio::time::timeout(EXIT_GRACE, self.process.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = self.process.kill().await;
                None
            }
        };
        let own = tokio::time::timeout(EXIT_GRACE, &mut self.stderr)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        match (own, status) {
            (Some(message), _) => format!("child process {} failed: {message}", self.index),
            (None, Some(status)) if !status.success() => format!(
                "child process {} {what} ({})",
                self.index,
                exit_text(status)
            ),
            _ => format!("child process {} {what}", self.index),
        }
    }
}

fn exit_text(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => format!("ended by {status}"),
    }
}

/// The arguments a child gets; the Redis URL goes through `REDIS_URL`.
fn child_args(plan: &Plan, index: u32) -> Vec<String> {
    let mut args = vec![
        "simulate".to_owned(),
        format!("--child={index}"),
        format!("--run-id={}", plan.run_id),
        format!("--processes={}", plan.processes),
        format!("--workers={}", plan.workers),
        format!("--conversations={}", plan.conversations),
        format!("--messages={}", plan.messages),
        format!("--hold={}", plan.hold.as_millis()),
    ];
    if let Some(lifetime) = plan.lifetime {
        args.push(format!("--lifetime={}", lifetime.as_secs_f64()));
    }
    if let Some(prefix) = plan.redis.as_ref().and_then(|c| c.key_prefix.as_ref()) {
        args.push(format!("--key-prefix={prefix}"));
    }
    if plan.no_lock {
        args.push("--no-lock".to_owned());
    }
    if plan.verbose > 0 {
        args.push(format!("-{}", "v".repeat(usize::from(plan.verbose))));
    }
    args
}

/// Runs the children and merges their samples; returns them with the time
/// from the common start to the last child's end. Any child failing fails the
/// run (exit 3); the others are killed.
pub(crate) async fn run_parent(
    plan: &Plan,
    shared: &Shared,
    bar: &ProgressBar,
) -> Result<(Samples, f64), CliError> {
    let mut workers = Vec::with_capacity(plan.processes as usize);
    for index in 0..plan.processes {
        workers.push(Worker::spawn(plan, index)?);
    }
    // They connect in parallel; collect the readiness one by one.
    for i in 0..workers.len() {
        if let Err(what) = workers[i].ready().await {
            let worker = workers.swap_remove(i);
            return Err(CliError::store(worker.failure(&what).await));
        }
    }

    let started = Instant::now();
    for i in 0..workers.len() {
        if let Err(what) = workers[i].go().await {
            let worker = workers.swap_remove(i);
            return Err(CliError::store(worker.failure(&what).await));
        }
    }
    let mut running = JoinSet::new();
    for worker in workers {
        running.spawn(worker.finish());
    }

    let mut merged = Samples::default();
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            joined = running.join_next() => match joined {
                None => break,
                Some(Ok(Ok(samples))) => merged.merge(samples),
                // Dropping `running` kills the other children.
                Some(Ok(Err(message))) => return Err(CliError::store(message)),
                Some(Err(e)) => {
                    return Err(CliError::store(format!("watching a child process failed: {e}")))
                }
            },
            _ = progress.tick(), if !bar.is_hidden() => {
                if let Ok(handled) = shared.handled().await {
                    bar.set_position(handled);
                }
            }
        }
    }
    Ok((merged, started.elapsed().as_secs_f64()))
}

/// A child's side: connect, say `ready`, wait for `go`, handle every P-th
/// message, print the samples as one JSON line.
pub(crate) async fn run_child(plan: &Plan, index: u32) -> Result<ExitCode, CliError> {
    let store = open_store(plan).await?;
    let shared = open_shared(plan).await?;
    print_out("ready\n");
    let mut line = String::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    let read = stdin.read_line(&mut line).await;
    if !matches!(read, Ok(n) if n > 0) || line.trim() != "go" {
        return Err(CliError::store(
            "the parent process went away before the start",
        ));
    }
    let samples = run_handlers(
        plan,
        store,
        shared,
        plan.arrivals(index),
        ProgressBar::hidden(),
    )
    .await;
    print_json(&samples, "samples")?;
    Ok(ExitCode::SUCCESS)
}
