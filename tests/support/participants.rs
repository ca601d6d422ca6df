//! Lock participants as separate OS processes (`examples/participant.rs`)
//! running critical sections in a loop, and the check of the log they keep.

use std::process::Stdio;
use std::time::Duration;

use super::examples::example_binary;

/// The list a participant logs each critical section on `cid` to, on the
/// conversation's shard (its hash tag is the conversation's).
pub fn section_log_key(prefix: &str, cid: &str) -> String {
    format!("{prefix}:xlog:{{{cid}}}")
}

/// The counter a participant increments, non-atomically, in each critical
/// section on `cid`, on the conversation's shard.
pub fn section_counter_key(prefix: &str, cid: &str) -> String {
    format!("{prefix}:xcount:{{{cid}}}")
}

/// `processes` participants (`--role loop`) against `url` under `prefix`,
/// each running `count` critical sections on every conversation of `cids`
/// within 100 s, logging them to [`section_log_key`] and counting them in
/// [`section_counter_key`], with `extra` arguments (`--hold-ms`,
/// `--lifetime-ms`, ...). Killed if dropped before they finish. Build the
/// example first ([`example_binary`]) if the build must not count against
/// a clock.
pub fn spawn_loopers(
    processes: usize,
    url: &str,
    prefix: &str,
    cids: &[String],
    count: usize,
    extra: &[&str],
) -> Vec<tokio::process::Child> {
    let binary = example_binary("participant");
    let log_key = section_log_key(prefix, "<cid>");
    let counter_key = section_counter_key(prefix, "<cid>");
    (0..processes)
        .map(|_| {
            let mut command = tokio::process::Command::new(&binary);
            command.args(["--redis", url, "--prefix", prefix]);
            for cid in cids {
                command.args(["--conversation", cid]);
            }
            command
                .args(["--role", "loop", "--count", &count.to_string()])
                .args(["--max-seconds", "100", "--log-key", &log_key])
                .args(["--counter-key", &counter_key])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawning a participant")
        })
        .collect()
}

/// Waits up to `within` for each participant, asserts it exited 0 after
/// printing `done <done>`, and returns each one's stdout lines.
pub async fn finish_all(
    children: Vec<tokio::process::Child>,
    within: Duration,
    done: usize,
) -> Vec<Vec<String>> {
    let mut transcripts = Vec::new();
    for child in children {
        let output = tokio::time::timeout(within, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("a participant did not finish within {within:?}"))
            .expect("waiting for a participant");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let transcript = format!(
            "{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "a participant exited with {}:\n{transcript}",
            output.status
        );
        let done = format!("done {done}");
        assert!(stdout.lines().any(|l| l == done), "{transcript}");
        transcripts.push(stdout.lines().map(str::to_owned).collect());
    }
    transcripts
}

/// One critical section, from a participant's `--log-key` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub ticket: u64,
    pub fence: u64,
    pub pid: u32,
    /// Wall-clock µs of the grant entry (the participant's first action).
    pub granted_us: u128,
    /// Wall-clock µs of the release entry (its last action before releasing).
    pub released_us: u128,
}

/// Parses a `--log-key` list (`LRANGE` output, one entry per line:
/// `grant|release <ticket> <fence> <pid> <µs>`) and asserts that it is a
/// sequence of disjoint sections, each grant followed by its own release,
/// with strictly increasing fencing tokens (grant order is fencing order).
/// `what` names the conversation in failure messages.
pub fn disjoint_sections(what: &str, log: &str) -> Vec<Section> {
    let entries: Vec<(String, u64, u64, u32, u128)> = log
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 5, "malformed log line {line:?} of {what}");
            let n = |i: usize| f[i].parse::<u128>().expect("a number");
            let narrow = |i: usize| u64::try_from(n(i)).expect("a u64");
            (
                f[0].to_owned(),
                narrow(1),
                narrow(2),
                u32::try_from(n(3)).expect("a pid"),
                n(4),
            )
        })
        .collect();
    let mut sections: Vec<Section> = Vec::with_capacity(entries.len() / 2);
    for pair in entries.chunks(2) {
        let [grant, release] = pair else {
            panic!("{what}: a grant without its release at the end: {pair:?}\n{log}")
        };
        assert_eq!(grant.0, "grant", "{what}: {pair:?}\n{log}");
        assert_eq!(
            (release.0.as_str(), release.1, release.2, release.3),
            ("release", grant.1, grant.2, grant.3),
            "overlapping sections on {what}: {pair:?}\n{log}"
        );
        if let Some(last) = sections.last() {
            assert!(
                last.fence < grant.2,
                "fencing token not increasing on {what}: {last:?} then {pair:?}\n{log}"
            );
        }
        sections.push(Section {
            ticket: grant.1,
            fence: grant.2,
            pid: grant.3,
            granted_us: grant.4,
            released_us: release.4,
        });
    }
    sections
}
