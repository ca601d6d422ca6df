"""``python -m ticketlock``: the command line of the Python package.

Subcommands print JSON lines on stdout (one object per line, flushed):

- ``contend``: N critical sections, each a deliberately non-atomic GET/SET of
  a counter plus an RPUSH of ``"<ticket> <lang> <pid> <epoch> <fence>"``
  (``py``, or ``pya`` for asyncio tasks) to a log list: what the
  cross-language test runs beside Rust processes;
- ``lock``: takes the lock once (events ``waiting``, ``acquired``,
  ``released``), holding it for ``--hold-ms`` or until a line on stdin;
- ``scripts``: every operation's SHA1 (as EVALSHA wants it) and the library name;
- ``keys``: the key (and wake-up channel) of a conversation;
- ``inspect``: everything about one conversation (read-only).

Errors are one line on stderr, never a traceback. Exit codes: 0 success,
1 a lock error (timeout, expired, foreign data), 2 bad arguments or
settings, 3 Redis unreachable or failing, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from . import _protocol as p
from ._async import AsyncLockStore
from ._errors import Backend, InvalidInput, LockError, classify
from ._scripts import script_set
from ._sync import LockStore
from ._validate import DEFAULT_DEAD_WAITER_TIMEOUT, DEFAULT_WAIT_TIME, conversation_keys

EXIT_OK, EXIT_LOCK, EXIT_USAGE, EXIT_REDIS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
PROG = "python -m ticketlock"


def emit(**fields: Any) -> None:
    print(json.dumps(fields, separators=(",", ":"), ensure_ascii=False), flush=True)


def _options(args: argparse.Namespace) -> p.LockOptions:
    return p.LockOptions(
        lifetime=args.lifetime_s,
        wait_time=args.wait_time_s,
        timeout=args.timeout_s,
        dead_waiter_timeout=args.dead_waiter_timeout_s,
    )


def _store(args: argparse.Namespace) -> LockStore:
    return LockStore.from_url(args.redis, key_prefix=args.prefix, socket_timeout=args.socket_timeout_s)


def _wait_for_go(args: argparse.Namespace, lang: str) -> None:
    if args.ready_go:
        emit(event="ready", lang=lang, pid=os.getpid())
        sys.stdin.readline()


def _cmd_contend(args: argparse.Namespace) -> int:
    if args.asyncio:
        return asyncio.run(_contend_async(args))
    store = _store(args)
    client = store.client
    pid = os.getpid()
    options = _options(args)
    client.ping()
    _wait_for_go(args, "py")
    waits: List[float] = []
    started = time.monotonic()
    for _ in range(args.count):
        asked = time.monotonic()
        with store.lock_with(args.conversation, options) as held:
            waits.append(time.monotonic() - asked)
            value = int(client.get(args.counter_key) or 0)
            if args.hold_ms:
                time.sleep(args.hold_ms / 1000)
            client.set(args.counter_key, value + 1)
            client.rpush(args.log_key, f"{held.ticket} py {pid} {held.epoch} {held.fencing_token}")
    _summary("py", pid, 1, waits, started)
    return EXIT_OK


async def _contend_async(args: argparse.Namespace) -> int:
    pid = os.getpid()
    options = _options(args)
    stores = [
        AsyncLockStore.from_url(args.redis, key_prefix=args.prefix, socket_timeout=args.socket_timeout_s)
        for _ in range(args.stores)
    ]
    try:
        await stores[0].client.ping()
        if args.ready_go:
            emit(event="ready", lang="pya", pid=pid)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        waits: List[float] = []
        started = time.monotonic()

        async def task(store: AsyncLockStore) -> None:
            client = store.client
            for _ in range(args.count):
                asked = time.monotonic()
                async with store.lock_with(args.conversation, options) as held:
                    waits.append(time.monotonic() - asked)
                    value = int(await client.get(args.counter_key) or 0)
                    if args.hold_ms:
                        await asyncio.sleep(args.hold_ms / 1000)
                    await client.set(args.counter_key, value + 1)
                    await client.rpush(args.log_key, f"{held.ticket} pya {pid} {held.epoch} {held.fencing_token}")

        await asyncio.gather(*(task(stores[i % len(stores)]) for i in range(args.tasks)))
        _summary("pya", pid, args.tasks, waits, started)
    finally:
        for store in stores:
            await store.close()
    return EXIT_OK


def _summary(lang: str, pid: int, tasks: int, waits: List[float], started: float) -> None:
    emit(
        lang=lang,
        pid=pid,
        tasks=tasks,
        count=len(waits),
        elapsed_ms=round((time.monotonic() - started) * 1000, 1),
        wait_ms_mean=round(sum(waits) / max(len(waits), 1) * 1000, 3),
        wait_ms_max=round(max(waits, default=0.0) * 1000, 3),
    )


def _cmd_lock(args: argparse.Namespace) -> int:
    store = _store(args)

    def on_wait(ticket: int, ahead: int) -> None:
        emit(event="waiting", ticket=ticket, ahead=ahead, unix_ns=time.time_ns())

    guard = store.acquire(args.conversation, _options(args), on_wait=on_wait)
    emit(
        event="acquired",
        ticket=guard.ticket,
        epoch=guard.epoch,
        fence=guard.fencing_token,
        waited_ms=round(guard.waited * 1000, 3),
        unix_ns=time.time_ns(),
    )
    if args.hold_until_stdin:
        sys.stdin.readline()
    elif args.hold_ms:
        time.sleep(args.hold_ms / 1000)
    release_start = time.time_ns()
    guard.release()
    emit(event="released", ticket=guard.ticket, release_start_unix_ns=release_start, unix_ns=time.time_ns())
    return EXIT_OK


def _cmd_scripts(args: argparse.Namespace) -> int:
    scripts = script_set(sharded=args.sharded)
    emit(scripts={name: s.sha for name, s in scripts.scripts.items()}, library=scripts.library_name)
    return EXIT_OK


def _cmd_keys(args: argparse.Namespace) -> int:
    emit(key=conversation_keys(args.prefix, args.conversation))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    found = _store(args).inspect(args.conversation)
    fields: Dict[str, Any] = found._asdict()
    fields["tickets"] = [t._asdict() for t in found.tickets]
    emit(**fields)
    return EXIT_OK


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog=PROG,
        description="Command line of the ticketlock Python package (the same queues as the Rust crate).",
        epilog="Exit codes: 0 ok, 1 lock error, 2 bad arguments, 3 Redis unreachable or failing, 130 interrupted.",
    )
    root.add_argument("-v", "--verbose", action="store_true", help="debug log on stderr")
    commands = root.add_subparsers(dest="command", required=True)

    def connection(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--redis", required=True, help="redis://host:port/db, rediss://..., redis+cluster://...")
        sub.add_argument("--prefix", default=None, help="alphanumeric key prefix P (keys P:lock:...)")
        sub.add_argument("--socket-timeout-s", type=_seconds, default=None, help="bound on every call (default 10)")
        sub.add_argument("--conversation", required=True)

    def lock_args(sub: argparse.ArgumentParser) -> None:
        connection(sub)
        sub.add_argument("--lifetime-s", type=_seconds, default=None, help="the lease, from the grant")
        sub.add_argument("--wait-time-s", type=_seconds, default=DEFAULT_WAIT_TIME)
        sub.add_argument("--timeout-s", type=_seconds, default=None)
        sub.add_argument("--dead-waiter-timeout-s", type=_seconds, default=DEFAULT_DEAD_WAITER_TIMEOUT)
        sub.add_argument("--hold-ms", type=float, default=0)

    contend = commands.add_parser("contend", help="N non-atomic increments under the lock; a JSON summary")
    lock_args(contend)
    contend.add_argument("--count", type=int, required=True, help="critical sections (per task)")
    contend.add_argument("--counter-key", required=True)
    contend.add_argument("--log-key", required=True)
    contend.add_argument("--asyncio", action="store_true", help="asyncio tasks instead of one synchronous loop")
    contend.add_argument("--tasks", type=int, default=1, help="with --asyncio: concurrent tasks")
    contend.add_argument("--stores", type=int, default=1, help="with --asyncio: stores the tasks share")
    contend.add_argument("--ready-go", action="store_true", help='print {"event":"ready"}, start at a line on stdin')
    contend.set_defaults(run=_cmd_contend)

    lock = commands.add_parser("lock", help="take the lock once; JSON events on stdout")
    lock_args(lock)
    lock.add_argument("--hold-until-stdin", action="store_true", help="release at a line on stdin")
    lock.set_defaults(run=_cmd_lock)

    scripts = commands.add_parser("scripts", help="SHA1 of every operation's code")
    scripts.add_argument("--sharded", action="store_true", help="the Redis Cluster variant (SPUBLISH)")
    scripts.set_defaults(run=_cmd_scripts)

    keys = commands.add_parser("keys", help="the key (and wake-up channel) of a conversation")
    keys.add_argument("--prefix", default=None)
    keys.add_argument("--conversation", required=True)
    keys.set_defaults(run=_cmd_keys)

    inspect = commands.add_parser("inspect", help="everything about one conversation (read-only)")
    connection(inspect)
    inspect.set_defaults(run=_cmd_inspect)
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        code: int = args.run(args)
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        error = e if isinstance(e, LockError) else classify(e, None)
        print(f"{PROG}: {_one_line(str(error))}", file=sys.stderr)
        if isinstance(error, InvalidInput):
            return EXIT_USAGE
        if isinstance(error, Backend):
            return EXIT_REDIS
        return EXIT_LOCK


def _one_line(text: str) -> str:
    return " ".join(text.split())
