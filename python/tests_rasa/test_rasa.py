"""ticketlock.rasa.TicketLockStore in a real Rasa 3.6 environment."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from typing import Any, Dict, List

import pytest
import redis
from rasa.core.lock import Ticket, TicketLock
from rasa.core.lock_store import LockError, LockStore
from rasa.utils.endpoints import EndpointConfig, read_endpoint_config

import ticketlock
from redis_harness import RedisServer
from ticketlock.rasa import TicketLockStore

HERE = os.path.dirname(os.path.abspath(__file__))
# Seconds one multi-process run may take before its processes count as hung.
RUN_LIMIT = 90


def make(server: RedisServer, prefix: str, **extra: Any) -> TicketLockStore:
    config = EndpointConfig(
        url="127.0.0.1", type="ticketlock.rasa.TicketLockStore", port=server.port, key_prefix=prefix, **extra
    )
    store = LockStore.create(config)
    assert isinstance(store, TicketLockStore)
    return store


def test_loads_from_endpoints_yml(server: RedisServer, prefix: str, tmp_path: Any) -> None:
    path = tmp_path / "endpoints.yml"
    path.write_text(
        "lock_store:\n"
        "  type: ticketlock.rasa.TicketLockStore\n"
        "  url: 127.0.0.1\n"
        f"  port: {server.port}\n"
        "  db: 1\n"
        f"  key_prefix: {prefix}\n"
        "  socket_timeout: 5\n"
    )
    store = LockStore.create(read_endpoint_config(str(path), "lock_store"))
    assert isinstance(store, TicketLockStore) and isinstance(store, LockStore)
    assert store.key_prefix == f"{prefix}:lock:"
    assert store.issue_ticket("yml") == 0
    assert redis.Redis(port=server.port, db=1).exists(f"{prefix}:lock:{{yml}}") == 1
    store.delete_lock("yml")


def test_rasa_method_shapes(server: RedisServer, prefix: str) -> None:
    store = make(server, prefix)
    cid = "shapes {x} é"
    assert store.get_lock(cid) is None and not store.is_someone_waiting(cid)
    created = store.create_lock(cid)
    assert type(created) is TicketLock and created.conversation_id == cid
    assert store.get_or_create_lock(cid).tickets == deque()
    first, second = store.issue_ticket(cid, 30), store.issue_ticket(cid)
    assert (first, second) == (0, 1)
    lock = store.get_lock(cid)
    assert isinstance(lock, TicketLock) and isinstance(lock.tickets, deque)
    assert [t.number for t in lock.tickets] == [0, 1] and all(isinstance(t, Ticket) for t in lock.tickets)
    assert 25 < lock.tickets[0].expires - time.time() <= 30
    assert lock.now_serving == 0 and lock.last_issued == 1 and not lock.is_locked(0) and lock.is_locked(1)
    assert store.is_someone_waiting(cid)
    # Rasa's read-modify-write helpers still work, atomically per save.
    lock.remove_ticket_for(0)
    store.save_lock(lock)
    saved = store.get_lock(cid)
    assert saved is not None and [t.number for t in saved.tickets] == [1]
    store.finish_serving(cid, 1)
    assert not store.is_someone_waiting(cid)
    store.update_lock(cid)
    number = store.issue_ticket(cid, 30)
    assert number == 2  # numbers never go down within a record
    store.cleanup(cid, number)
    assert store.get_lock(cid) is None
    store.issue_ticket(cid, 30)
    store.delete_lock(cid)
    assert store.get_lock(cid) is None
    # A lock built by Rasa's own TicketLock and saved: first ticket 0.
    own = store.create_lock("fresh")
    assert own.issue_ticket(30) == 0
    store.save_lock(own)
    assert store.get_lock("fresh").now_serving == 0  # type: ignore[union-attr]
    store.delete_lock("fresh")


def test_lock_logs_rasas_lines_and_hands_over_by_push(server: RedisServer, prefix: str, caplog: Any) -> None:
    store = make(server, prefix)
    caplog.set_level(logging.DEBUG, logger="rasa.core.lock_store")

    async def main() -> float:
        async with store.lock("c") as held:
            assert isinstance(held, TicketLock) and not held.is_locked(0)

            async def wait() -> float:
                async with store.lock("c", wait_time_in_seconds=30):
                    return time.monotonic()

            waiter = asyncio.ensure_future(wait())
            while "Failed to acquire" not in caplog.text:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)
            released = time.monotonic()
        return await asyncio.wait_for(waiter, 10) - released

    took = asyncio.run(main())
    assert took < 0.5, f"hand-over took {took * 1000:.1f} ms with wait_time_in_seconds=30"
    text = caplog.text
    for line in (
        "Issuing ticket for conversation 'c'.",
        "Acquiring lock for conversation 'c'.",
        "Acquired lock for conversation 'c'.",
        "Failed to acquire lock for conversation ID 'c' because 1 other item(s) for this conversation ID "
        "have to be finished processing first. Retrying in 30 seconds ...",
    ):
        assert line in text, f"missing Rasa's log line: {line}"
    assert store.get_lock("c") is None


def test_a_waiter_whose_ticket_is_gone_gets_lock_error_at_once(server: RedisServer, prefix: str) -> None:
    store = make(server, prefix)

    async def main() -> float:
        async with store.lock("gone"):
            waiter = asyncio.ensure_future(store.lock("gone", wait_time_in_seconds=30).__aenter__())
            while len(store.get_lock("gone").tickets) < 2:  # type: ignore[union-attr]
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            started = time.monotonic()
            store.finish_serving("gone", 1)
            with pytest.raises(LockError):
                await asyncio.wait_for(waiter, 5)
            return time.monotonic() - started

    assert asyncio.run(main()) < 0.5


def test_a_holder_whose_lease_ran_out_gets_lock_error(server: RedisServer, prefix: str) -> None:
    store = make(server, prefix)

    async def main() -> None:
        with pytest.raises(LockError):
            async with store.lock("lapse", lock_lifetime=0.1):
                await asyncio.sleep(0.3)
                store.update_lock("lapse")

    asyncio.run(main())


def test_errors_are_rasas(prefix: str) -> None:
    store = TicketLockStore(EndpointConfig(url="127.0.0.1", port=9, socket_timeout=1))
    for call in (lambda: store.get_lock("c"), lambda: store.issue_ticket("c"), lambda: store.cleanup("c", 0)):
        with pytest.raises(LockError):
            call()

    async def main() -> None:
        with pytest.raises(LockError):
            async with store.lock("c"):
                pass

    asyncio.run(main())
    with pytest.raises(LockError):
        TicketLockStore(EndpointConfig(url="127.0.0.1", key_prefix="not-alnum"))
    with pytest.raises(LockError):
        TicketLockStore(EndpointConfig(url="127.0.0.1", colour="red"))
    with pytest.raises(LockError):
        make_store_lifetime = TicketLockStore(EndpointConfig(url="127.0.0.1", port=9))
        asyncio.run(_enter(make_store_lifetime, lock_lifetime=0))


async def _enter(store: TicketLockStore, **kwargs: Any) -> None:
    async with store.lock("c", **kwargs):
        pass


def test_ticket_lock_lifetime_is_honoured(server: RedisServer, prefix: str) -> None:
    code = (
        "import asyncio, sys\n"
        "from rasa.utils.endpoints import EndpointConfig\n"
        "from ticketlock.rasa import TicketLockStore\n"
        f"s = TicketLockStore(EndpointConfig(url='127.0.0.1', port={server.port}, key_prefix='{prefix}'))\n"
        "n = s.issue_ticket('env')\n"
        "print(int(s.get_lock('env').tickets[0].expires - __import__('time').time() + 0.5))\n"
        "async def main():\n"
        "    async with s.lock('env2'):\n"
        "        print(s.store.inspect('env2').tickets[0].lease_ms)\n"
        "asyncio.run(main())\n"
        "s.delete_lock('env')\n"
    )
    env = dict(os.environ, TICKET_LOCK_LIFETIME="7")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["7", "7000"]


def test_redis_py_without_sharded_pub_sub_refuses_a_cluster_clearly() -> None:
    # Rasa 3.6 pins redis<5, whose clients have no SSUBSCRIBE.
    assert int(redis.__version__.split(".")[0]) < 5
    for make_store in (ticketlock.LockStore.from_url, ticketlock.AsyncLockStore.from_url):
        with pytest.raises(ticketlock.InvalidInput) as caught:
            make_store("redis+cluster://127.0.0.1:7000")
        assert "sharded pub/sub" in str(caught.value) and redis.__version__ in str(caught.value)


def _contend(kind: str, server: RedisServer, prefix: str, processes: int, count: int, tasks: int) -> Dict[str, Any]:
    cid, counter = "contended", f"{prefix}:data:{kind}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "worker.py"),
                kind,
                str(server.port),
                prefix,
                cid,
                counter,
                str(count),
                str(tasks),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results: List[Dict[str, Any]] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
        started = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        # One deadline for the whole run: Rasa's store can hang for good (a
        # waiter whose ticket expired waits until the record is gone).
        deadline = started + RUN_LIMIT
        hung = 0
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                hung += 1
                results.append({"done": 0, "errors": [f"hung: killed after {RUN_LIMIT} s"], "seconds": RUN_LIMIT})
                continue
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    client = redis.Redis(port=server.port, db=1)
    value = int(client.get(counter) or 0)
    done = int(client.get(counter + ":done") or 0)
    client.delete(counter, counter + ":done")
    return {
        "store": kind,
        "processes": processes,
        "tasks_per_process": tasks,
        "sections_done": done,
        "counter": value,
        "lost_updates": done - value,
        "errors": sum(len(r["errors"]) for r in results),
        "hung_processes": hung,
        "error_samples": sorted({e for r in results for e in r["errors"]})[:3],
        "seconds": round(elapsed, 2),
    }


def test_processes_contending_ours_loses_nothing_rasas_is_reported(server: RedisServer, prefix: str) -> None:
    """N OS processes around a non-atomic read-modify-write, the same code for
    both stores. Ours: 0 lost updates, asserted. Rasa's RedisLockStore: its
    losses are reported (scripts/test.sh prints this), never asserted."""
    runs, processes, count, tasks = 3, 4, 25, 1
    report = []
    for kind in ("ours", "rasa"):
        for run in range(runs):
            result = _contend(kind, server, f"{prefix}{kind}{run}", processes, count, tasks)
            result["run"] = run + 1
            report.append(result)
            if kind == "ours":
                assert result["errors"] == 0 and result["hung_processes"] == 0, result
                assert result["sections_done"] == processes * count * tasks, result
                assert result["lost_updates"] == 0, result
    path = os.environ.get("TICKETLOCK_RASA_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    for line in report:
        print("RASA-CONTENTION", json.dumps(line))
    leftovers = redis.Redis(port=server.port, db=1).keys(f"{prefix}ours*")
    assert leftovers == [], leftovers
