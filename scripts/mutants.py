#!/usr/bin/env python3
"""Break the queue's rules on purpose, one at a time, and see which break the
tests notice (scripts/mutants.sh runs this; see its header).

Lua: every mutant below is one rule of lua/ changed by one exact text
replacement. Each is applied, the crate rebuilt (the scripts are embedded at
compile time), the tests that hold the rules run, and the file restored,
whatever happens (also on Ctrl-C). Rust: cargo-mutants over the in-memory
twin (src/backend/memory.rs), tickets (src/ticket.rs) and the acquire and
release paths (src/store.rs, src/guard.rs), with the tests in RUST_TESTS.

Prints one table: mutant, caught or survived, and by which test. Exits 1 if a
mutant marked `must` survived, 2 on a usage error, a mutant that no longer
applies (its text is not in the file exactly once) or a Rust round that did
not run.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    must: bool = True
    # Why the mutant cannot change behaviour, if it cannot; such a survivor
    # is reported as "equivalent", not as a miss.
    equivalent: str | None = None


L = "lua/"
LUA = [
    # common.lua: refusing foreign data before anything is written
    Mutant("load accepts a record of another version", L + "common.lua",
           "if v[1] and v[1] ~= 'v2' then", "if false then"),
    Mutant("load accepts a field that is not an integer", L + "common.lua",
           "if not number or number % 1 ~= 0 then", "if false then"),
    Mutant("load accepts a record without its fields", L + "common.lua",
           "if m.exists and not (m.n and m.h and m.s and m.f and m.g) then", "if false then"),
    Mutant("parse accepts a ticket that does not parse", L + "common.lua",
           "  if not at then\n    refuse(m.key, 'holds ticket '", "  if false then\n    refuse(m.key, 'holds ticket '"),
    # common.lua: liveness and expiry
    Mutant("a grant not picked up ignores its lease from the grant", L + "common.lua",
           "t.at = math.min(t.stored, m.g + t.lease)", "t.at = t.stored"),
    Mutant("the lease from the grant also bounds a picked-up grant", L + "common.lua",
           "if t.number == m.s and m.g ~= 0 and t.lease > 0 then", "if t.number == m.s and t.lease > 0 then"),
    Mutant("scan: a ticket expiring now is expired", L + "common.lua",
           "if t.at >= now then return number, t end", "if t.at > now then return number, t end"),
    Mutant("scan: expired tickets met are not dropped", L + "common.lua",
           "        dead[#dead + 1] = number\n", ""),
    Mutant("scan skips nothing (the ticket leaving is a head candidate)", L + "common.lua",
           "if number ~= leaving and values[i] then", "if values[i] then"),
    # common.lua: grants and fencing
    Mutant("next_fence: a grant in the same microsecond keeps the token", L + "common.lua",
           "return previous + 1 end", "return previous end"),
    Mutant("next_fence: equal clock readings count as later", L + "common.lua",
           "if previous and now_us <= previous then", "if previous and now_us < previous then"),
    Mutant("grant re-grants the ticket served already", L + "common.lua",
           "  if head == m.s then return false end\n", ""),
    Mutant("grant leaves the cursor below the head", L + "common.lua",
           "  if head ~= m.h then\n    m.h = head\n    set(w, 'h', head)\n  end\n", "",
           equivalent="the cursor only saves reads: tickets below the head are gone, so a scan from lower finds the same head"),
    Mutant("a new grant is not bounded by its lease from now", L + "common.lua",
           "  if granted then effective(m, ticket) end\n", ""),
    Mutant("confirm counts the lease from a second after the grant", L + "common.lua",
           "local granted_at = m.g", "local granted_at = m.g + 1000"),
    Mutant("confirm leaves the grant not picked up", L + "common.lua",
           "  m.g = 0\n  set(w, 'g', 0)\n  if ticket.lease > 0 then", "  if ticket.lease > 0 then"),
    # common.lua: key lifetimes
    Mutant("expire_at may shorten the key's life", L + "common.lua",
           "redis.call('PEXPIREAT', key, int(at + MARGIN_MS), 'GT')", "redis.call('PEXPIREAT', key, int(at + MARGIN_MS))"),
    Mutant("MARGIN_MS 1000 -> 0", L + "common.lua",
           "local MARGIN_MS = 1000", "local MARGIN_MS = 0"),
    Mutant("forget_request keeps expired cancellations", L + "common.lua",
           "elseif tonumber(untilms) >= now then", "elseif true then"),
    Mutant("drop forgets remembered cancellations", L + "common.lua",
           "  if x ~= '' then\n    local last = 0", "  if false then\n    local last = 0"),
    # common.lua: leave (release and cancel) and its announcements
    Mutant("leave: a lapsed ticket counts as removed", L + "common.lua",
           "if ticket and ticket.at >= now then removed = 1 end", "if ticket then removed = 1 end"),
    Mutant("leave: a removed waiter is not told", L + "common.lua",
           "if ticket and number ~= before and not owner then waiter = number end", "if false then waiter = number end"),
    Mutant("leave: an owner's own removal is announced too", L + "common.lua",
           "if ticket and number ~= before and not owner then waiter = number end", "if ticket and number ~= before then waiter = number end"),
    Mutant("leave: a holder removed by someone else is not told (queue empties)", L + "common.lua",
           "if granted or waiter ~= -1 or (head == -1 and was_served and not owner) then", "if granted or waiter ~= -1 then"),
    Mutant("leave: cleanup of the last ticket tells nobody the holder left", L + "common.lua",
           "    if was_served and not owner then announce(m, -1, -1, -1) end\n    return { removed, -1 }", "    return { removed, -1 }"),
    Mutant("leave: cleanup keeps an emptied record", L + "common.lua",
           "if head == -1 and mode == 'cleanup' then", "if false then"),
    # issue.lua
    Mutant("issue: the empty-conversation fast path runs whatever the key holds", L + "issue.lua",
           "if not redis.call('HMGET', key, 'next')[1] then", "if true then"),
    Mutant("issue ignores a cancel that came first", L + "issue.lua",
           "  if found then\n    if x == ''", "  if false then\n    if x == ''"),
    Mutant("issue: a number at the 2^53 bound is refused", L + "issue.lua",
           "if number > MAX_TICKET then", "if number >= MAX_TICKET then"),
    Mutant("issue: a number past the 2^53 bound is issued", L + "issue.lua",
           "if number > MAX_TICKET then", "if false then"),
    Mutant("issue: a waiting renewing ticket lives its lease", L + "issue.lua",
           "waiting = { at = now + liveness,", "waiting = { at = now + lifetime,"),
    Mutant("issue: a new grant (the head expired) is not announced", L + "issue.lua",
           "if granted then announce(m, head, -1, ahead.at - now) end", ""),
    Mutant("issue: the key keeps its old expiry", L + "issue.lua",
           "expire_at(key, waiting.at, false)", ""),
    # poll.lua
    Mutant("poll ignores the epoch", L + "poll.lua",
           "tonumber(ARGV[2]) ~= m.e) or not mine", "false) or not mine"),
    Mutant("poll: an expired served ticket is served", L + "poll.lua",
           "if mine and number == m.s and mine.at >= now then", "if mine and number == m.s then"),
    Mutant("poll: a waiter's check-in does not renew it", L + "poll.lua",
           "    mine.at = now + mine.liveness\n", ""),
    Mutant("poll: a grant made by a poll is not announced", L + "poll.lua",
           "if granted and head ~= number then announce(m, head, -1, left) end", ""),
    Mutant("poll: ahead counts from the cursor", L + "poll.lua",
           "number - head, left, own, -1 }", "number - m.h, left, own, -1 }",
           equivalent="after a poll's settle the cursor is the head"),
    # release.lua
    Mutant("release ignores the epoch", L + "release.lua",
           "tonumber(ARGV[3]) ~= m.e then value = nil end", "false then value = nil end"),
    Mutant("release: the fast path deletes a queue with tickets behind", L + "release.lua",
           "number == m.h and m.n == number + 1 and not m.x then", "number == m.h and not m.x then"),
    Mutant("release: the fast path reports a lapsed lease as removed", L + "release.lua",
           "  if ticket.at >= now then return { 1, -1 } end", "  if true then return { 1, -1 } end"),
    Mutant("release: the fast path never tells a removed holder", L + "release.lua",
           "  if number == m.s and not owner then announce(m, -1, -1, -1) end\n", ""),
    Mutant("release: no caller is the owner", L + "release.lua",
           "local owner = ARGV[4] == 'owner'", "local owner = false"),
    # extend.lua
    Mutant("extend skips the owner's fencing-token check", L + "extend.lua",
           "number == m.s and m.f == fence and mine.at >= now then", "number == m.s and mine.at >= now then"),
    Mutant("extend revives an expired lease", L + "extend.lua",
           "number == m.s and m.f == fence and mine.at >= now then", "number == m.s and m.f == fence then"),
    Mutant("extend: a shorter lease is not announced", L + "extend.lua",
           "if mine.at < before and m.n > number + 1 then announce(m, number, -1, lease) end", ""),
    Mutant("extend: a lost lease does not hand over", L + "extend.lua",
           "if granted then announce(m, head, -1, ticket.at - now) end", ""),
    # read.lua
    Mutant("read: a ticket expiring now is left out", L + "read.lua",
           "  if t.at >= now then live", "  if t.at > now then live"),
    Mutant("read: with limit 0 there is always someone", L + "read.lua",
           "  if head ~= -1 then reply[4] = 1 end", "  reply[4] = 1"),
    Mutant("read leaves the terms out", L + "read.lua",
           "  reply[#reply + 1] = t.lease\n", "  reply[#reply + 1] = 0\n"),
    # save.lua
    Mutant("save drops every ticket's terms", L + "save.lua",
           "set(w, 't' .. int(t.number), format(t))", "t.lease, t.liveness = 0, 0\n  set(w, 't' .. int(t.number), format(t))"),
    Mutant("save re-grants an unchanged head", L + "save.lua",
           "if head ~= -1 and head ~= m.s then", "if head ~= -1 then"),
    Mutant("save: removed waiters are not told", L + "save.lua",
           "if granted or removed ~= -1 or (gone_holder and head == -1) then", "if granted or (gone_holder and head == -1) then"),
    Mutant("save: a removed holder of an emptied queue is not told", L + "save.lua",
           "if granted or removed ~= -1 or (gone_holder and head == -1) then", "if granted or removed ~= -1 then"),
    Mutant("save: numbers may go down", L + "save.lua",
           "local n, low, latest = math.max(m.n, next_min), nil, 0", "local n, low, latest = next_min, nil, 0"),
    Mutant("save forgets request ids", L + "save.lua",
           "  if old then request = old.request end\n", ""),
    # cancel.lua
    Mutant("cancel does not give back a ticket that was issued", L + "cancel.lua",
           "    leave(m, t.number, t.value, 'cleanup', true, now, now_us, nil)\n", ""),
    Mutant("cancel remembers nothing", L + "cancel.lua",
           "redis.call('HSET', key, 'next', 'v2', 'x', x .. request .. ' ' .. int(now + remember))",
           "redis.call('HSET', key, 'next', 'v2')"),
    # update.lua and delete.lua
    Mutant("update: a ticket expiring now is dropped", L + "update.lua",
           "  if t.at < now then", "  if t.at <= now then"),
    Mutant("update: a new grant is not announced", L + "update.lua",
           "if granted then announce(m, head, -1, effective(m, ticket).at - now) end", ""),
    Mutant("delete tells nobody", L + "delete.lua",
           "announce(m, -1, -1, -1)\nreturn { 1 }", "return { 1 }"),
]

# The tests that hold the Lua rules: the conformance cases on one Redis
# fixture (EVALSHA; every script is reloaded by SHA after a rebuild), the
# differential test, and the Redis-edge tests.
LUA_TESTS = [
    # on_redis_eval:: is every case on one fixture; redis_ the Redis-only
    # cases (foreign data, garbage, round trips) beside them.
    ["cargo", "test", "--quiet", "--test", "conformance", "--", "on_redis_eval::", "redis_"],
    ["cargo", "test", "--quiet", "--test", "differential", "--test", "guarantees",
     "--test", "operator", "--test", "script_costs", "--test", "lua_contract"],
]
# "---- <name> stdout ----" heads each failure's output, with or without --quiet.
FAILED_TEST = re.compile(r"^---- (\S+) stdout ----", re.M)

_original: dict[Path, str] = {}


def restore() -> None:
    for path, text in _original.items():
        path.write_text(text)
    _original.clear()


def on_signal(signum, _frame) -> None:
    restore()
    sys.exit(128 + signum)


def run_tests(commands: list[list[str]], timeout: float) -> list[str]:
    """Names of the failed tests ('build' when it did not build, 'timeout')."""
    failed: list[str] = []
    for command in commands:
        try:
            out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            failed.append("timeout")
            continue
        text = out.stdout + out.stderr
        if out.returncode != 0:
            names = FAILED_TEST.findall(text)
            if names:
                failed.extend(names)
            elif "error: could not compile" in text:
                failed.append("build")
            else:
                failed.append(" ".join(command[2:]) + " (failed)")
    return failed


def lua_round(mutants: list[Mutant], timeout: float) -> list[tuple[str, str, str, Mutant]]:
    rows = []
    for i, m in enumerate(mutants, 1):
        path = ROOT / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            restore()
            print(f"mutants: {m.name!r}: its text is in {m.file} {text.count(m.old)} times, not once", file=sys.stderr)
            sys.exit(2)
        _original[path] = text
        path.write_text(text.replace(m.old, m.new, 1))
        started = time.monotonic()
        try:
            failed = run_tests(LUA_TESTS, timeout)
        finally:
            restore()
        took = time.monotonic() - started
        verdict = "caught" if failed else ("equivalent" if m.equivalent else "survived")
        by = ", ".join(sorted(set(failed))[:3]) + (f" (+{len(set(failed)) - 3})" if len(set(failed)) > 3 else "")
        if not failed and m.equivalent:
            by = m.equivalent
        print(f"[{i}/{len(mutants)}] {verdict:10} {m.file}: {m.name} ({took:.0f} s)", file=sys.stderr, flush=True)
        rows.append((f"{m.file}: {m.name}", verdict, by, m))
    # The clean tree must be green, or every "caught" means nothing.
    return rows


RUST_FILES = ["src/backend/memory.rs", "src/ticket.rs", "src/store.rs", "src/guard.rs"]
# In store.rs and guard.rs only the acquire and release paths.
RUST_FUNCTIONS = (
    r"memory\.rs|ticket\.rs|lock_with|lock_via_store|wait_for_grant|wait_until_served|"
    r"issue_owned|take_ticket|issue_once|owned|within|grant_in|removes|give_back|"
    r"Releaser|Pending|OwnedTicket|LockGuard::(new|release|extend|is_held|stop_keeping)|"
    r"Keeper::(run|pick_up|check|extend|set_until)"
)
RUST_EXCLUDE = r"fmt|Debug|tracing|inspect|Inspection|debug_tests|#\[cfg\(test\)\]"
# The in-memory conformance cases, the differential test (which also compares
# the wake-ups), the unit tests, the in-memory fault scenarios (release and
# pick-up retries) and the guards dropped while a runtime shuts down.
RUST_TESTS = ("test(/^in_memory::/) | binary(differential) | binary(ticketlock)"
              " | (binary(faults_injected) & test(/in_memory/))"
              " | (binary(guarantees) & test(/guards_dropped|without_a_runtime/))")
# Build only the test targets that run (every other test binary would be
# linked again for each mutant).
RUST_TARGETS = ["--lib", "--test=conformance", "--test=differential", "--test=faults_injected",
                "--test=guarantees"]
# Survivors that cannot change what a caller sees, with the reason; matched
# on the mutant's name without its line and column.
RUST_EQUIVALENT = {
    "replace < with <= in Pending::run":
        "a retry whose pause ends exactly at the deadline, to the nanosecond: Instants never tie in practice",
    "replace match guard Some(epoch) == me.epoch && head < me.number with true in LockStore::wait_until_served":
        "such a notice (no grant or removal of ours) means our ticket lapsed unannounced, so our check-in is overdue and its poll, next, says Expired",
    "replace + with - in LockStore::wait_until_served":
        "checks just before the head's lease ends instead of just after: that poll finds it still served and sets the next check past it",
    "replace match guard i == self.0.len() with false in Tickets::insert":
        "VecDeque::insert at the end is push_back",
    "replace match guard c.served == Some(number) && at >= now with false in State::poll":
        "skips settle only when the caller's live ticket is served: settle would find that head and grant nothing new",
}
# The filters above leave some 550 mutants: a run over all of them takes
# hours. By default one fixed eighth runs (cargo-mutants --shard 0/8,
# round-robin: every eighth mutant of the list, 69), 877 s measured on 2
# cores; --rust-shard 3/8 runs another eighth, --rust-shard 0/1 all.
RUST_SHARD = "0/8"


# nextest's line for a failed test: "FAIL [ 1.234s] (5/74) ticketlock::differential memory_and_redis_agree"
FAILED_NEXTEST = re.compile(r"^\s*FAIL \[[^\]]*\] (?:\(\s*\d+/\d+\) )?(\S+) (\S+)\s*$", re.M)


def failed_rust_tests(log: Path) -> str:
    """The tests a mutant's cargo-mutants log shows failing, for the table."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    failed = sorted({f"{binary} {test}" for binary, test in FAILED_NEXTEST.findall(text)})
    return ", ".join(failed) or "the build of the tests"


def rust_round(timeout: float, shard: str = RUST_SHARD) -> list[tuple[str, str, str, Mutant | None]]:
    if subprocess.run(["cargo", "mutants", "--version"], cwd=ROOT, capture_output=True).returncode != 0:
        print("mutants: installing cargo-mutants (cargo install cargo-mutants --locked)", file=sys.stderr)
        subprocess.run(["cargo", "install", "cargo-mutants", "--locked"], check=True)
    out_dir = ROOT / "target" / "mutants"
    # cargo-mutants makes mutants.out below it, but not the folder itself.
    out_dir.mkdir(parents=True, exist_ok=True)
    command = ["cargo", "mutants", "--no-shuffle", "--output", str(out_dir), "--timeout", str(int(timeout)),
               "--test-tool", "nextest", "--re", RUST_FUNCTIONS, "--exclude-re", RUST_EXCLUDE,
               "--shard", shard, "--sharding", "round-robin"]
    for target in RUST_TARGETS:
        command += ["--cargo-arg", target]
    for f in RUST_FILES:
        command += ["--file", f]
    command += ["--", "-E", RUST_TESTS]
    print("mutants: " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, cwd=ROOT)
    results = out_dir / "mutants.out" / "outcomes.json"
    if not results.exists():
        print(f"mutants: cargo-mutants wrote no {results}; see its output above", file=sys.stderr)
        return [("cargo-mutants (Rust)", "did not run", "", None)]
    outcomes = json.loads(results.read_text())
    rows = []
    for o in outcomes.get("outcomes", []):
        scenario = o.get("scenario")
        if not isinstance(scenario, dict) or "Mutant" not in scenario:
            continue
        mutant = scenario["Mutant"]
        # "src/guard.rs:182:43: replace < with <= in Pending::run"
        name = mutant.get("name") or f"{mutant['file']}:{mutant['span']['start']['line']}: ?"
        summary = o.get("summary", "")
        verdict = {"CaughtMutant": "caught", "MissedMutant": "survived", "Timeout": "caught",
                   "Unviable": "unviable"}.get(summary, summary)
        by = ""
        if summary == "Timeout":
            by = f"a test ran past {int(timeout)} s"
        elif verdict == "caught":
            by = failed_rust_tests(out_dir / "mutants.out" / o.get("log_path", ""))
        reason = RUST_EQUIVALENT.get(name.split(": ", 1)[-1])
        if verdict == "survived" and reason:
            verdict, by = "equivalent", reason
        rows.append((name, verdict, by, None))
    return rows


def table(rows) -> str:
    lines = ["| mutant | outcome | by |", "| --- | --- | --- |"]
    for name, verdict, by, _ in rows:
        lines.append(f"| {name} | {verdict} | {by} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the Lua mutants only")
    parser.add_argument("--only", help="run only the Lua mutants whose name contains this")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test command")
    parser.add_argument("--rust-shard", default=RUST_SHARD,
                        help=f"which part of the Rust mutants to run, k/n (default {RUST_SHARD}; 0/1 for all)")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    started = time.monotonic()
    print("mutants: the clean tree first", file=sys.stderr, flush=True)
    if run_tests(LUA_TESTS, args.timeout):
        print("mutants: the tests fail without any mutant; fix that first", file=sys.stderr)
        return 2
    chosen = [m for m in LUA if not args.only or args.only in m.name]
    rows = lua_round(chosen, args.timeout)
    if not args.quick and not args.only:
        rows += rust_round(args.timeout, args.rust_shard)
    report = table(rows)
    print(report)
    out = ROOT / "target" / "mutants.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report + "\n")
    counted = [r for r in rows if r[1] in ("caught", "survived")]
    survived = [r for r in counted if r[1] == "survived"]
    print(f"\nmutants: {len(counted) - len(survived)} of {len(counted)} caught, "
          f"{len(survived)} survived, {sum(r[1] == 'equivalent' for r in rows)} equivalent; "
          f"{time.monotonic() - started:.0f} s; table in {out}", file=sys.stderr)
    bad = [r for r in survived if r[3] is not None and r[3].must]
    for name, *_ in bad:
        print(f"mutants: MUST be caught, survived: {name}", file=sys.stderr)
    if any(r[1] == "did not run" for r in rows):
        print("mutants: the Rust round did not run", file=sys.stderr)
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
