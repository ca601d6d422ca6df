"""``python -m ticketlock`` as separate OS processes: the CLI's output and
exit codes, and sync processes plus asyncio tasks sharing one conversation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

import redis

import ticketlock as tl
from redis_harness import RedisServer


def cli(*args: str, timeout: float = 60, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ticketlock", *args], capture_output=True, text=True, timeout=timeout, stdin=stdin
    )


def test_scripts_and_keys() -> None:
    out = cli("scripts")
    assert out.returncode == 0, out.stderr
    shas = json.loads(out.stdout)["scripts"]
    assert shas == {name: s.sha for name, s in tl.script_set().scripts.items()}
    out = cli("keys", "--prefix", "P", "--conversation", "}odd{ 50% id")
    assert json.loads(out.stdout) == {"key": "P:lock:{%7Dodd%7B 50%25 id}"}


def test_errors_are_one_line_with_an_exit_code(server: RedisServer) -> None:
    out = cli("lock", "--redis", "redis://127.0.0.1:9/0", "--conversation", "c")
    assert out.returncode == 3 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = cli("lock", "--redis", "nonsense", "--conversation", "c")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "invalid url" in out.stderr
    out = cli("lock", "--redis", server.url(1), "--conversation", "")
    assert out.returncode == 2 and "conversation id" in out.stderr


def test_a_socket_timeout_is_one_line_not_a_traceback() -> None:
    stalled = RedisServer()
    try:
        stalled.pause()
        started = time.monotonic()
        out = cli("lock", "--redis", stalled.url(1), "--socket-timeout-s", "0.5", "--conversation", "c")
        assert time.monotonic() - started < 30
        assert out.returncode == 3, out
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert "imeout" in out.stderr
    finally:
        stalled.close()


def test_lock_events(url: str, prefix: str) -> None:
    out = cli("lock", "--redis", url, "--prefix", prefix, "--conversation", "ev", "--hold-ms", "10")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["event"] for e in events] == ["acquired", "released"] and events[0]["ticket"] == 0


def test_sync_processes_and_asyncio_tasks_share_one_fifo_queue(url: str, prefix: str) -> None:
    """Two synchronous processes and one process of 3 asyncio tasks (over 2
    stores) each take one conversation's lock 60 times around a non-atomic
    GET/SET: no update is lost, grants follow ticket order, nothing is left."""
    cid = "xp {shared} 100% é"
    counter, log = f"{prefix}:data:counter", f"{prefix}:data:log"
    common = [
        "--redis",
        url,
        "--prefix",
        prefix,
        "--conversation",
        cid,
        "--count",
        "60",
        "--counter-key",
        counter,
        "--log-key",
        log,
        "--lifetime-s",
        "30",
        "--dead-waiter-timeout-s",
        "30",
        "--ready-go",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ticketlock", "contend", *common, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in ([], [], ["--asyncio", "--tasks", "3", "--stores", "2"])
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline())["event"] == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        summaries: List[Dict[str, Any]] = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            summaries.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    client = redis.Redis.from_url(url)
    total = 60 * 5
    assert int(client.get(counter) or 0) == total, "updates were lost: two holders overlapped"
    entries = [e.decode().split(" ") for e in client.lrange(log, 0, -1)]
    assert len(entries) == total
    grants = [(int(e[3]), int(e[0]), int(e[4]), e[1]) for e in entries]  # epoch, ticket, fence, lang
    for a, b in zip(grants, grants[1:]):
        assert (a[0], a[1]) < (b[0], b[1]), f"granted out of ticket order: {a} then {b}"
        assert a[2] < b[2], "fencing tokens not increasing"
    assert {g[3] for g in grants} == {"py", "pya"}
    client.delete(counter, log)
    assert client.keys(prefix + ":*") == []
    print("summaries:", summaries, "pid", os.getpid())


def test_hand_off_between_processes_is_pushed(url: str, prefix: str) -> None:
    """A waiting process that would poll only every 30 s is served promptly
    when another process releases: the wake-up is pushed."""
    took: List[float] = []
    py = [sys.executable, "-m", "ticketlock", "lock", "--redis", url, "--prefix", prefix, "--lifetime-s", "30"]
    for round_ in range(3):
        cid = f"hand-off {round_}"
        holder = subprocess.Popen(
            [*py, "--conversation", cid, "--hold-until-stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None
        assert json.loads(holder.stdout.readline())["event"] == "acquired"
        waiter = subprocess.Popen(
            [*py, "--conversation", cid, "--wait-time-s", "30", "--dead-waiter-timeout-s", "90"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiter.stdout is not None and holder.stdin is not None
            assert json.loads(waiter.stdout.readline())["event"] == "waiting"
            time.sleep(0.2)
            holder.stdin.write("go\n")
            holder.stdin.flush()
            released = json.loads(holder.stdout.read().strip().splitlines()[-1])
            acquired = json.loads(waiter.stdout.readline())
            assert acquired["event"] == "acquired" and acquired["ticket"] == 1
            took.append((acquired["unix_ns"] - released["release_start_unix_ns"]) / 1e6)
            assert waiter.wait(30) == 0 and holder.wait(30) == 0
        finally:
            for proc in (holder, waiter):
                if proc.poll() is None:
                    proc.kill()
    print("python -> python hand-off ms:", [round(t, 2) for t in took])
    assert max(took) < 2000, took
