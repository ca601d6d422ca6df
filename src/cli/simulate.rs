//! `ticketlock simulate`: a chatbot fleet in miniature.
//!
//! Messages of `C` conversations arrive interleaved (round robin); `W`
//! handler tasks per process handle them under the conversation's lock
//! ([`handlers`](super::handlers)) and probes check that the lock did its job.
//! With `--processes P` the messages are dealt to `P` child processes
//! ([`children`](super::children)) sharing one Redis; the probes then live in
//! Redis too. This module runs the whole: start, signals, verdict, clean-up.

use std::process::ExitCode;
use std::time::Duration;

use ticketlock::LockStore;

use super::children;
use super::handlers::{open_shared, open_store, run_handlers};
use super::plan::{Plan, SimulateArgs};
use super::report::{Samples, Summary};
use super::state::Shared;
use super::{print_error, print_json, print_out, CliError};

/// How long removing the keys of an abandoned run may take (they expire
/// by themselves anyway).
const ABANDON_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `ticketlock simulate`.
pub(crate) async fn run(args: SimulateArgs, verbose: u8) -> Result<ExitCode, CliError> {
    let plan = Plan::new(&args, verbose)?;
    if let Some(index) = args.child {
        return children::run_child(&plan, index).await;
    }
    let store = open_store(&plan).await?;
    let shared = open_shared(&plan).await?;
    let lifetime = plan.lifetime.unwrap_or(store.default_lifetime());
    tracing::debug!(run_id = %plan.run_id, "simulation starts");

    let bar = plan.progress_bar();
    let run = async {
        if plan.processes > 1 {
            // The children open connections of their own.
            children::run_parent(&plan, &shared, &bar).await
        } else {
            Ok(run_here(&plan, store.clone(), &shared, &bar).await)
        }
    };
    let result = tokio::select! {
        result = run => result,
        error = signalled() => Err(error),
    };
    bar.finish_and_clear();
    let (samples, elapsed) = match result {
        Ok((samples, elapsed)) if samples.store_failure.is_none() => (samples, elapsed),
        Ok((samples, _)) => {
            abandon(&plan, &store, &shared).await;
            return Err(CliError::store(store_failure(&plan, &samples)));
        }
        Err(e) => {
            abandon(&plan, &store, &shared).await;
            return Err(e);
        }
    };
    let outcomes = shared.outcomes().await;
    let cleaned = cleanup(&plan, &shared).await;
    let outcomes = outcomes.map_err(|e| {
        let mut message = format!("cannot read the results from {}: {e}", shown(&plan));
        if let Some(first) = &samples.first_error {
            message.push_str(&format!(
                " (after {} lock error(s), the first: {first})",
                samples.errors
            ));
        }
        CliError::store(message)
    })?;
    let summary = Summary::new(
        plan.setup(lifetime),
        plan.total(),
        samples,
        &outcomes,
        elapsed,
    );

    if plan.json {
        print_json(&summary, "summary")?;
    } else {
        print_out(&summary.table());
    }
    if summary.ok {
        // Only line on stderr then; a failed run's line says more.
        if let Err(e) = cleaned {
            print_error(&e);
        }
        Ok(ExitCode::SUCCESS)
    } else {
        print_error(&summary.failure_line());
        Ok(ExitCode::FAILURE)
    }
}

/// The store, as messages name it.
fn shown(plan: &Plan) -> String {
    plan.redis
        .as_ref()
        .map_or_else(|| "memory://".to_owned(), ToString::to_string)
}

/// The one line of a run the store failed: what failed first, and what the
/// handlers had done by then.
fn store_failure(plan: &Plan, samples: &Samples) -> String {
    format!(
        "the store failed ({}): {}; {} of {} messages were handled before",
        shown(plan),
        samples.store_failure.as_deref().unwrap_or_default(),
        samples.handled,
        plan.total()
    )
}

/// Resolves with the error of the first SIGINT (Ctrl-C, exit 130) or
/// SIGTERM (exit 143); never if neither can be watched.
async fn signalled() -> CliError {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        #[cfg(unix)]
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = interrupt => CliError::interrupted(),
        () = terminate => CliError::terminated(),
    }
}

/// After an interruption, a failed child or a failed store: remove the
/// run's queues and probe keys rather than leave them to expire (best
/// effort, bounded in time; everything expires by itself otherwise).
async fn abandon(plan: &Plan, store: &LockStore, shared: &Shared) {
    let removal = async {
        // The handlers just dropped their guards and lock futures: let the
        // store give those tickets back (and cancel issues still in flight)
        // first, or that would come after the deletes and leave keys behind.
        store.flush(ABANDON_TIMEOUT / 2).await;
        for cid in plan.conversation_ids() {
            if let Err(e) = store.delete_lock(&cid).await {
                tracing::debug!(conversation_id = %cid, error = %e, "could not delete the queue");
                break;
            }
        }
        let _ = cleanup(plan, shared).await;
    };
    let _ = tokio::time::timeout(ABANDON_TIMEOUT, removal).await;
}

/// Deletes the probe keys; the error says which keys are left.
async fn cleanup(plan: &Plan, shared: &Shared) -> Result<(), String> {
    shared.cleanup().await.map_err(|e| {
        tracing::debug!(error = %e, "could not delete the probe keys");
        format!("could not delete the probe keys sim:{}:*: {e}", plan.run_id)
    })
}

/// One process's share of the run, in this process (`--processes 1`).
async fn run_here(
    plan: &Plan,
    store: LockStore,
    shared: &Shared,
    bar: &indicatif::ProgressBar,
) -> (Samples, f64) {
    let started = tokio::time::Instant::now();
    let samples = run_handlers(plan, store, shared.clone(), plan.arrivals(0), bar.clone()).await;
    (samples, started.elapsed().as_secs_f64())
}
