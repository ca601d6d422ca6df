#!/usr/bin/env python3
"""ticketlock for Python: the crate's Redis ticket locks, from the same Lua files.

Strictly first-in-first-out, expiring, per-conversation locks shared with the
Rust crate (and any other client) through one Redis. Every state change is one
of the scripts in ``lua/``, sent exactly as the crate sends it (``common.lua``
followed by the operation's file, so the SHA1 is the crate's too) with EVALSHA,
loading it on NOSCRIPT. This module decides nothing about the queue itself: it
derives key names, calls the scripts, decodes their replies and waits.

    import redis
    from ticketlock import TicketLockStore

    store = TicketLockStore(redis.Redis.from_url("redis://127.0.0.1:6379/1"))
    with store.lock("conv-1", lifetime_s=30) as held:
        ...  # held.ticket, held.fencing_token

Needs Python 3.11 and redis-py (``python3 -m pip install redis``). One
server (or a Sentinel-managed master) only: the crate's Redis Cluster variant
announces wake-ups with SPUBLISH, which this client does not listen to. It
always uses EVALSHA; Rust processes on the same Redis may use the Functions
library (FCALL) meanwhile: the code, keys and wake-ups are the same.

Differences from the Rust ``LockStore``: a grant learnt from a wake-up is
picked up with one more ``poll`` before ``acquire()`` returns (the crate does
that in the background), and there is no automatic lease renewal (call
``extend()``).

Command line (``--help`` for details)::

    ticketlock.py contend --redis URL --conversation C --count N \\
        --counter-key K --log-key L [--prefix P] [--hold-ms X]
    ticketlock.py lock --redis URL --conversation C [--hold-until-stdin]
    ticketlock.py scripts | keys --conversation C [--prefix P]
    ticketlock.py selftest --redis URL
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

try:
    import redis
except ImportError:  # the CLI reports it; the library raises on first use
    redis = None

__all__ = [
    "DEFAULT_DEAD_WAITER_TIMEOUT_S",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LIFETIME_S",
    "DEFAULT_WAIT_TIME_S",
    "LockExpired",
    "LockGuard",
    "LockSnapshot",
    "LockTimeout",
    "MAX_CONVERSATION_ID_LEN",
    "MAX_LIFETIME_S",
    "ReplyError",
    "TicketInfo",
    "TicketLockError",
    "TicketLockStore",
    "load_scripts",
]

log = logging.getLogger("ticketlock")

#: Prefix of every key when none is configured (the crate's ``lock:``).
DEFAULT_KEY_PREFIX = "lock:"
#: Longest conversation id accepted, in UTF-8 bytes (the crate's bound).
MAX_CONVERSATION_ID_LEN = 1024
#: Longest lifetime accepted (365 days); the Lua scripts hold the same bound.
MAX_LIFETIME_S = 365 * 24 * 3600
#: A lease's length when none is given (the crate's DEFAULT_LIFETIME).
DEFAULT_LIFETIME_S = 60.0
#: Longest pause between two checks when no wake-up arrives (DEFAULT_WAIT_TIME).
DEFAULT_WAIT_TIME_S = 1.0
#: A waiting ticket lapses this long after its waiter's last check-in
#: (DEFAULT_DEAD_WAITER_TIMEOUT); a waiter checks in three times per period.
DEFAULT_DEAD_WAITER_TIMEOUT_S = 5.0

#: The operations, as in ``lua/<name>.lua``.
OPERATIONS = ("issue", "poll", "release", "read", "save", "delete", "update", "extend")
#: Where the Lua files are: ``../lua`` next to this script, or $TICKETLOCK_LUA_DIR.
LUA_DIR_ENV = "TICKETLOCK_LUA_DIR"

# Slack past an expiry, so the check after it sees it expired (the crate's PAST).
_PAST_S = 0.002
# How long to wait for Redis to confirm a SUBSCRIBE.
_SUBSCRIBE_TIMEOUT_S = 10.0
# A Lua integer argument's upper bound (2^53 - 1).
_MAX_INTEGER = 9007199254740991
_PREFIX_RE = re.compile(r"[A-Za-z0-9]+")
# lua/common.lua announce(): "<epoch> <serving> <fence> <removed> <serving_ms>", -1 for none.
_NOTICE_RE = re.compile(rb"(\d+) (-?\d+) (-?\d+) (-?\d+) (-?\d+)")


# --- errors --------------------------------------------------------------------


class TicketLockError(Exception):
    """Base of this module's own errors (Redis errors pass through unchanged)."""


class LockExpired(TicketLockError):
    """The ticket expired or was removed before it was served, or the lease was
    lost while held. It will never be served (the crate's LockError::Expired)."""

    def __init__(self, conversation_id: str, ticket: int):
        super().__init__(
            f"ticket {ticket} of conversation {_shown(conversation_id)} "
            "expired or was removed before it was served"
        )
        self.conversation_id = conversation_id
        self.ticket = ticket


class LockTimeout(TicketLockError):
    """Not served within the timeout; the ticket was given back (LockError::Timeout)."""

    def __init__(self, conversation_id: str, ticket: int, waited_s: float):
        super().__init__(
            f"timed out after {waited_s:.3f}s waiting for conversation "
            f"{_shown(conversation_id)} (ticket {ticket})"
        )
        self.conversation_id = conversation_id
        self.ticket = ticket
        self.waited_s = waited_s


class ReplyError(TicketLockError):
    """A script replied something its contract does not allow (version mismatch?)."""


def _shown(conversation_id: str) -> str:
    """A bounded, escaped form of an id for messages (ids may hold anything)."""
    shown = repr(conversation_id[:64])
    if len(conversation_id) > 64:
        shown += f"... ({len(conversation_id.encode('utf-8', 'replace'))} bytes)"
    return shown


# --- input checks ----------------------------------------------------------------


def _conversation_id(conversation_id: Any) -> str:
    if not isinstance(conversation_id, str):
        raise ValueError(f"invalid conversation id: {conversation_id!r} is not a str")
    if not conversation_id:
        raise ValueError("invalid conversation id: it is empty")
    try:
        size = len(conversation_id.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid conversation id: not encodable as UTF-8 ({e})") from None
    if size > MAX_CONVERSATION_ID_LEN:
        raise ValueError(
            f"invalid conversation id: {_shown(conversation_id)} is {size} bytes, "
            f"more than the {MAX_CONVERSATION_ID_LEN} allowed"
        )
    return conversation_id


def _seconds(value: Any, what: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"invalid {what}: {value!r} is not a number of seconds")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"invalid {what}: {value} seconds is not a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"invalid {what}: {value} seconds is not greater than zero")
    if value > MAX_LIFETIME_S:
        raise ValueError(
            f"invalid {what}: {value} seconds is longer than the maximum of {MAX_LIFETIME_S} seconds"
        )
    return value


def _milliseconds(value: Any, what: str) -> int:
    """Seconds to whole ms like the crate: to the nearest ns, then rounded up to
    ms, so a tiny positive value never becomes zero."""
    nanos = round(_seconds(value, what) * 1e9)
    return max(1, -(-nanos // 1_000_000))


def _key_prefix(key_prefix: str | None) -> str:
    if key_prefix is None:
        return DEFAULT_KEY_PREFIX
    if not isinstance(key_prefix, str) or not _PREFIX_RE.fullmatch(key_prefix):
        raise ValueError(
            f"invalid key prefix: {key_prefix!r} must be non-empty and ASCII alphanumeric"
        )
    return f"{key_prefix}:{DEFAULT_KEY_PREFIX}"


# --- scripts ---------------------------------------------------------------------


def _default_lua_dir() -> Path:
    env = os.environ.get(LUA_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "lua"


def load_scripts(lua_dir: str | os.PathLike[str] | None = None) -> dict[str, bytes]:
    """Every operation's code as sent to Redis: ``common.lua`` + ``<name>.lua``,
    byte for byte as the crate concatenates them (so SHA1s match)."""
    base = Path(lua_dir) if lua_dir is not None else _default_lua_dir()
    try:
        common = (base / "common.lua").read_bytes()
        return {name: common + (base / f"{name}.lua").read_bytes() for name in OPERATIONS}
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"ticketlock: Lua file missing: {e.filename} (pass lua_dir= or set ${LUA_DIR_ENV})"
        ) from None


def _integers(name: str, reply: Any) -> list[int]:
    if not isinstance(reply, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in reply
    ):
        raise ReplyError(f"{name}.lua replied {reply!r}, expected a list of integers")
    return reply


def _broken(name: str, reply: list[int]) -> ReplyError:
    return ReplyError(f"{name}.lua replied {reply!r}, which does not match its contract")


# --- values ----------------------------------------------------------------------


@dataclass(frozen=True)
class TicketInfo:
    """A live ticket in a snapshot."""

    number: int
    remaining_ms: int


@dataclass(frozen=True)
class LockSnapshot:
    """A read-only view of one conversation's queue (lua/read.lua)."""

    conversation_id: str
    #: The number the next ticket will get.
    next_number: int
    epoch: int
    #: How many live tickets the queue holds.
    live: int
    #: Live tickets in serving order; the first is served now.
    tickets: tuple[TicketInfo, ...]

    @property
    def now_serving(self) -> int | None:
        return self.tickets[0].number if self.tickets else None


# --- the store -------------------------------------------------------------------


class TicketLockStore:
    """A handle on the ticket locks in one Redis under one key prefix.

    ``redis_client`` is a ``redis.Redis`` (any ``decode_responses``); wake-ups
    use ``redis_client.pubsub()``, a connection of their own. Thread-safe as
    far as the client is. ``key_prefix``: None for ``lock:``, or an ASCII
    alphanumeric P for ``P:lock:`` (the crate's ``key_prefix``).
    """

    def __init__(
        self,
        redis_client: Any,
        key_prefix: str | None = None,
        *,
        lua_dir: str | os.PathLike[str] | None = None,
    ):
        if redis is None:
            raise ImportError("ticketlock needs redis-py: python3 -m pip install redis")
        self._redis = redis_client
        self._prefix = _key_prefix(key_prefix)
        self._codes = load_scripts(lua_dir)
        self._scripts = {name: redis_client.register_script(code) for name, code in self._codes.items()}

    @property
    def key_prefix(self) -> str:
        """The full prefix of every key: ``lock:`` or ``P:lock:``."""
        return self._prefix

    def shas(self) -> dict[str, str]:
        """SHA1 of every operation's code, as EVALSHA wants it."""
        return {name: script.sha for name, script in self._scripts.items()}

    def keys(self, conversation_id: str) -> tuple[str, str, str]:
        """KEYS of every script: meta (also the wake-up channel), queue, expiry.

        ``<prefix>{<id>}`` with ``%``, ``{`` and ``}`` of the id percent-encoded,
        so the id is always exactly one Redis Cluster hash tag."""
        cid = _conversation_id(conversation_id)
        meta = self._prefix + "{" + cid.translate(_ENCODE) + "}"
        return meta, meta + ":q", meta + ":e"

    # -- raw script calls (each returns the decoded reply) --

    def _run(self, name: str, conversation_id: str, *args: Any) -> list[int]:
        keys = [k.encode("utf-8") for k in self.keys(conversation_id)]
        reply = self._scripts[name](keys=keys, args=[str(a).encode() for a in args])
        return _integers(name, reply)

    def _issue(self, cid: str, lifetime_ms: int, liveness_ms: int | None) -> tuple[int, int, int, int, int]:
        reply = self._run("issue", cid, lifetime_ms, "" if liveness_ms is None else liveness_ms)
        if len(reply) != 5 or reply[0] < 0 or reply[1] < 0 or reply[2] < 0:
            raise _broken("issue", reply)
        ticket, epoch, serving, head_ms, fence = reply
        if (serving == ticket) != (fence >= 0):
            raise _broken("issue", reply)
        return ticket, epoch, serving, head_ms, fence

    def _poll(self, cid: str, ticket: int, epoch: int | None) -> tuple[int, int, int, int, int, int]:
        reply = self._run("poll", cid, ticket, "" if epoch is None else epoch)
        if len(reply) != 6:
            raise _broken("poll", reply)
        status, _serving, ahead, _head_ms, own_ms, fence = reply
        if status not in (1, 0, -1) or (status == 1 and fence < 0) or (status == 0 and min(ahead, own_ms) < 0):
            raise _broken("poll", reply)
        return status, _serving, ahead, _head_ms, own_ms, fence

    def _release(self, cid: str, ticket: int, mode: str, epoch: int | None) -> tuple[bool, int]:
        reply = self._run("release", cid, ticket, mode, "" if epoch is None else epoch)
        if len(reply) != 2 or reply[0] not in (0, 1):
            raise _broken("release", reply)
        return reply[0] == 1, reply[1]

    def _extend(self, cid: str, ticket: int, fence: int, lease_ms: int) -> int | None:
        reply = self._run("extend", cid, ticket, fence, lease_ms)
        if len(reply) == 2 and reply[0] == 0:
            return None
        if len(reply) != 2 or reply[0] != 1 or reply[1] < 0:
            raise _broken("extend", reply)
        return reply[1]

    def _read(self, cid: str, limit: int) -> LockSnapshot | None:
        reply = self._run("read", cid, limit)
        if reply == [0]:
            return None
        if len(reply) < 4 or reply[0] != 1 or min(reply[1:4]) < 0 or len(reply) % 2:
            raise _broken("read", reply)
        pairs = reply[4:]
        tickets = tuple(TicketInfo(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2))
        if any(t.number < 0 or t.remaining_ms < 0 for t in tickets):
            raise _broken("read", reply)
        return LockSnapshot(cid, reply[1], reply[2], reply[3], tickets)

    # -- the crate's operations --

    def issue_ticket(self, conversation_id: str, lifetime_s: float) -> int:
        """Appends a fixed ticket (it expires ``lifetime_s`` after now, waiting
        included) and returns its number. The caller owns it: end it with
        ``finish_serving``/``cleanup`` or let it expire."""
        cid = _conversation_id(conversation_id)
        return self._issue(cid, _milliseconds(lifetime_s, "lifetime"), None)[0]

    def lock(
        self,
        conversation_id: str,
        lifetime_s: float = DEFAULT_LIFETIME_S,
        wait_time_s: float = DEFAULT_WAIT_TIME_S,
        timeout_s: float | None = None,
        *,
        dead_waiter_timeout_s: float = DEFAULT_DEAD_WAITER_TIMEOUT_S,
        on_wait: Callable[[int, int], None] | None = None,
    ) -> LockGuard:
        """The conversation's lock, as a context manager (or call ``acquire()``
        and ``release()`` yourself). Nothing happens until it is entered.

        ``lifetime_s``: the lease, counted from the grant. ``wait_time_s``:
        longest pause between checks when no wake-up comes. ``timeout_s``: give
        up after this long (``LockTimeout``, ticket given back); None waits as
        long as the queue moves. ``dead_waiter_timeout_s``: the waiting ticket
        lapses this long after this waiter's last check-in (it checks in three
        times per period), so a dead process stops blocking the queue.
        ``on_wait(ticket, ahead)`` is called after every check that finds the
        ticket waiting (progress displays, tests).

        Entering raises ``LockExpired`` when the ticket is found gone before it
        was served. Leaving releases the ticket (mode ``cleanup``: the record
        goes when nobody is queued) and raises ``LockExpired`` if the lease was
        lost meanwhile, unless the block raised.
        """
        cid = _conversation_id(conversation_id)
        return LockGuard(
            self,
            cid,
            lifetime_ms=_milliseconds(lifetime_s, "lifetime"),
            liveness_ms=_milliseconds(dead_waiter_timeout_s, "dead-waiter timeout"),
            wait_time_s=_seconds(wait_time_s, "wait time"),
            timeout_s=None if timeout_s is None else _seconds(timeout_s, "timeout", allow_zero=True),
            on_wait=on_wait,
        )

    def get_lock(self, conversation_id: str) -> LockSnapshot | None:
        """A snapshot of the queue (expired tickets left out), or None when the
        conversation has no record."""
        return self._read(_conversation_id(conversation_id), -1)

    def is_someone_waiting(self, conversation_id: str) -> bool:
        """True when the queue holds any live ticket (held or waiting)."""
        snapshot = self._read(_conversation_id(conversation_id), 0)
        return snapshot is not None and snapshot.live > 0

    def finish_serving(self, conversation_id: str, ticket: int) -> bool:
        """Removes ``ticket`` (served or not); the next live one is served and
        its waiter woken. The record stays. True if the ticket was there."""
        return self._release(_conversation_id(conversation_id), _ticket(ticket), "finish", None)[0]

    def cleanup(self, conversation_id: str, ticket: int) -> bool:
        """Like ``finish_serving``, and deletes the record when no live ticket
        is left. True if the ticket was there."""
        return self._release(_conversation_id(conversation_id), _ticket(ticket), "cleanup", None)[0]

    def delete_lock(self, conversation_id: str) -> bool:
        """Deletes the record and every ticket; waiters get ``LockExpired``."""
        reply = self._run("delete", _conversation_id(conversation_id))
        if len(reply) != 1 or reply[0] not in (0, 1):
            raise _broken("delete", reply)
        return reply[0] == 1

    def update_lock(self, conversation_id: str) -> int:
        """Prunes expired tickets (handing the lock on); returns how many."""
        reply = self._run("update", _conversation_id(conversation_id))
        if len(reply) != 2 or reply[0] < 0:
            raise _broken("update", reply)
        return reply[0]

    # -- waiting --

    def _subscribe(self, channel: str) -> Any:
        """A pub/sub connection subscribed to ``channel``, confirmed by Redis,
        so every later PUBLISH on it reaches us."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
        try:
            pubsub.subscribe(channel.encode("utf-8"))
            deadline = time.monotonic() + _SUBSCRIBE_TIMEOUT_S
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise redis.TimeoutError(f"Redis did not confirm SUBSCRIBE {channel!r}")
                message = pubsub.get_message(timeout=left)
                if message is not None and message.get("type") == "subscribe":
                    return pubsub
        except BaseException:
            pubsub.close()
            raise

    def _wait_until_served(self, guard: LockGuard, deadline: float | None) -> int:
        """The crate's acquire loop: subscribe, then check (which also checks
        in), then sleep until a wake-up that concerns us, the head's expiry,
        the next check-in, ``wait_time`` or the deadline. Returns the fence."""
        cid, me, epoch = guard.conversation_id, guard.ticket, guard.epoch
        assert me is not None
        heartbeat_s = max(guard._liveness_ms // 3, 1) / 1000
        pubsub = self._subscribe(self.keys(cid)[0])
        try:
            while True:
                status, _serving, ahead, head_ms, own_ms, fence = self._poll(cid, me, epoch)
                if status == 1:
                    return fence
                if status == -1:
                    raise LockExpired(cid, me)
                log.debug("ticket %d of %s waiting, %d ahead", me, _shown(cid), ahead)
                if guard._on_wait is not None:
                    guard._on_wait(me, ahead)
                # Check in well before our ticket would lapse.
                pause = min(guard._wait_time_s, heartbeat_s, own_ms / 2000)
                if head_ms >= 0:
                    pause = min(pause, head_ms / 1000 + _PAST_S)
                wake = time.monotonic() + pause
                if deadline is not None:
                    wake = min(wake, deadline)
                # Wait for a notice that concerns us, or the next check.
                while True:
                    left = wake - time.monotonic()
                    if left <= 0:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise LockTimeout(cid, me, guard._waited())
                        break
                    if pubsub is None:
                        time.sleep(left)
                        continue
                    try:
                        message = pubsub.get_message(timeout=left)
                    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                        # Like the crate when its subscription closes: go on by polling.
                        log.warning("ticketlock: wake-up connection failed (%s); polling instead", e)
                        pubsub.close()
                        pubsub = None
                        break
                    if message is None or message.get("type") != "message":
                        continue  # nothing yet, or not a publication
                    verdict, serving_left_ms = _judge(message.get("data"), me, epoch)
                    if verdict == _BEHIND:
                        # Still behind; check when the new head's grant runs out,
                        # in case its owner is dead.
                        if serving_left_ms >= 0:
                            wake = min(wake, time.monotonic() + serving_left_ms / 1000 + _PAST_S)
                        continue
                    # Granted to us (the check picks the grant up and starts the
                    # lease), passed over, removed, or unreadable: ask now.
                    break
        finally:
            if pubsub is not None:
                pubsub.close()


def _ticket(ticket: Any) -> int:
    if isinstance(ticket, bool) or not isinstance(ticket, int) or not 0 <= ticket <= _MAX_INTEGER:
        raise ValueError(f"invalid ticket: {ticket!r} is not an integer in 0..{_MAX_INTEGER}")
    return ticket


_ENCODE = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})

_BEHIND, _ASK = "behind", "ask"


def _judge(data: Any, me: int, epoch: int) -> tuple[str, int]:
    """What a wake-up means for ticket ``me`` of record ``epoch``."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    match = _NOTICE_RE.fullmatch(data) if isinstance(data, bytes) else None
    if match is None:
        return _ASK, -1
    n_epoch, serving, _fence, removed, serving_left = (int(g) for g in match.groups())
    if n_epoch != epoch or removed == me:
        return _ASK, -1
    if 0 <= serving < me:
        return _BEHIND, serving_left
    return _ASK, -1


class LockGuard:
    """One attempt at a conversation's lock (``TicketLockStore.lock``).

    After ``acquire()`` (or entering ``with``): ``ticket``, ``epoch``,
    ``fencing_token`` and ``waited_s`` are set.
    """

    def __init__(
        self,
        store: TicketLockStore,
        conversation_id: str,
        *,
        lifetime_ms: int,
        liveness_ms: int,
        wait_time_s: float,
        timeout_s: float | None,
        on_wait: Callable[[int, int], None] | None,
    ):
        self._store = store
        self.conversation_id = conversation_id
        self._lifetime_ms = lifetime_ms
        self._liveness_ms = liveness_ms
        self._wait_time_s = wait_time_s
        self._timeout_s = timeout_s
        self._on_wait = on_wait
        self._started = 0.0
        self.ticket: int | None = None
        self.epoch: int | None = None
        #: The grant's fencing token: greater than every earlier grant's of
        #: this conversation; pass it with writes to shared resources.
        self.fencing_token: int | None = None
        self.waited_s: float | None = None
        self._held = False

    def _waited(self) -> float:
        return time.monotonic() - self._started

    def acquire(self) -> LockGuard:
        """Takes a ticket and waits until it is served; returns self."""
        if self.ticket is not None:
            raise RuntimeError("this LockGuard was acquired already; call store.lock() again")
        store, cid = self._store, self.conversation_id
        self._started = time.monotonic()
        deadline = None if self._timeout_s is None else self._started + self._timeout_s
        ticket, epoch, _serving, _head_ms, fence = store._issue(cid, self._lifetime_ms, self._liveness_ms)
        self.ticket, self.epoch = ticket, epoch
        try:
            if fence < 0:
                fence = store._wait_until_served(self, deadline)
        except LockExpired:
            raise  # nothing to give back
        except BaseException:
            # Timeout, Ctrl-C, connection trouble: give the ticket back now so
            # the queue does not wait for it to lapse.
            try:
                store._release(cid, ticket, "cleanup", epoch)
            except Exception as e:  # the original error matters more
                log.warning("ticketlock: giving back ticket %d failed: %s", ticket, e)
            raise
        self.fencing_token = fence
        self.waited_s = self._waited()
        self._held = True
        log.debug("ticket %d of %s acquired after %.3fs", ticket, _shown(cid), self.waited_s)
        return self

    def release(self) -> None:
        """Gives the lock to the next ticket (release mode ``cleanup``, this
        ticket's epoch). Raises ``LockExpired`` if the lease had been lost."""
        if not self._held:
            raise RuntimeError("this LockGuard does not hold the lock")
        self._held = False
        assert self.ticket is not None
        removed, _ = self._store._release(self.conversation_id, self.ticket, "cleanup", self.epoch)
        if not removed:
            raise LockExpired(self.conversation_id, self.ticket)

    def extend(self, lease_s: float) -> float:
        """Renews the lease to ``lease_s`` from now; returns the seconds left.
        Raises ``LockExpired`` if it was lost already (it is never revived)."""
        if not self._held:
            raise RuntimeError("this LockGuard does not hold the lock")
        assert self.ticket is not None and self.fencing_token is not None
        left = self._store._extend(
            self.conversation_id, self.ticket, self.fencing_token, _milliseconds(lease_s, "lease")
        )
        if left is None:
            raise LockExpired(self.conversation_id, self.ticket)
        return left / 1000

    def is_held(self) -> bool:
        """Asks the store whether this guard still holds the lock."""
        if not self._held or self.ticket is None:
            return False
        status, *_, fence = self._store._poll(self.conversation_id, self.ticket, self.epoch)
        return status == 1 and fence == self.fencing_token

    def __enter__(self) -> LockGuard:
        return self.acquire()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._held:
            return
        if exc_type is None:
            self.release()
            return
        try:
            self.release()
        except Exception as e:  # do not hide the block's own error
            log.warning("ticketlock: releasing ticket %s failed: %s", self.ticket, e)

    def __repr__(self) -> str:
        return (
            f"LockGuard(conversation_id={_shown(self.conversation_id)}, ticket={self.ticket}, "
            f"epoch={self.epoch}, fencing_token={self.fencing_token}, held={self._held})"
        )


# --- command line ----------------------------------------------------------------

EXIT_OK, EXIT_LOCK, EXIT_USAGE, EXIT_REDIS = 0, 1, 2, 3


def _emit(**fields: Any) -> None:
    print(json.dumps(fields, separators=(",", ":")), flush=True)


def _store_from(args: argparse.Namespace) -> tuple[Any, TicketLockStore]:
    client = redis.Redis.from_url(args.redis)
    return client, TicketLockStore(client, args.prefix, lua_dir=args.lua_dir)


def _lock_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "lifetime_s": args.lifetime_s,
        "wait_time_s": args.wait_time_s,
        "timeout_s": args.timeout_s,
        "dead_waiter_timeout_s": args.dead_waiter_timeout_s,
    }


def _cmd_contend(args: argparse.Namespace) -> int:
    """N critical sections, each a deliberately non-atomic GET/SET of the
    counter plus an RPUSH of "<ticket> py <pid> <epoch> <fence>" to the log."""
    client, store = _store_from(args)
    client.ping()
    pid = os.getpid()
    if args.ready_go:
        _emit(event="ready", lang="py", pid=pid)
        sys.stdin.readline()
    waits: list[float] = []
    started = time.monotonic()
    for _ in range(args.count):
        with store.lock(args.conversation, **_lock_options(args)) as held:
            value = int(client.get(args.counter_key) or 0)
            if args.hold_ms:
                time.sleep(args.hold_ms / 1000)
            client.set(args.counter_key, value + 1)
            client.rpush(args.log_key, f"{held.ticket} py {pid} {held.epoch} {held.fencing_token}")
            waits.append(held.waited_s or 0.0)
    _emit(
        lang="py",
        pid=pid,
        count=len(waits),
        elapsed_ms=round((time.monotonic() - started) * 1000, 1),
        wait_ms_mean=round(sum(waits) / max(len(waits), 1) * 1000, 3),
        wait_ms_max=round(max(waits, default=0.0) * 1000, 3),
    )
    return EXIT_OK


def _cmd_lock(args: argparse.Namespace) -> int:
    """Takes the lock once, reporting each step as a JSON line on stdout."""
    _client, store = _store_from(args)

    def on_wait(ticket: int, ahead: int) -> None:
        _emit(event="waiting", ticket=ticket, ahead=ahead, unix_ns=time.time_ns())

    guard = store.lock(args.conversation, on_wait=on_wait, **_lock_options(args))
    try:
        guard.acquire()
    except TicketLockError as e:
        _emit(event="error", error=type(e).__name__, message=str(e))
        return EXIT_LOCK
    _emit(
        event="acquired",
        ticket=guard.ticket,
        epoch=guard.epoch,
        fence=guard.fencing_token,
        waited_ms=round((guard.waited_s or 0) * 1000, 3),
        unix_ns=time.time_ns(),
    )
    if args.hold_until_stdin:
        sys.stdin.readline()
    elif args.hold_ms:
        time.sleep(args.hold_ms / 1000)
    release_start = time.time_ns()
    try:
        guard.release()
    except LockExpired as e:
        _emit(event="error", error="LockExpired", message=str(e))
        return EXIT_LOCK
    _emit(event="released", ticket=guard.ticket, release_start_unix_ns=release_start, unix_ns=time.time_ns())
    return EXIT_OK


def _cmd_scripts(args: argparse.Namespace) -> int:
    """The SHA1s EVALSHA is called with (redis-py computes them; no connection)."""
    store = TicketLockStore(redis.Redis(), lua_dir=args.lua_dir)
    _emit(scripts=store.shas())
    return EXIT_OK


def _cmd_keys(args: argparse.Namespace) -> int:
    prefix = _key_prefix(args.prefix)
    cid = _conversation_id(args.conversation)
    meta = prefix + "{" + cid.translate(_ENCODE) + "}"
    _emit(keys=[meta, meta + ":q", meta + ":e"])
    return EXIT_OK


def _cmd_selftest(args: argparse.Namespace) -> int:
    client = redis.Redis.from_url(args.redis)
    client.ping()
    prefix = "selftest" + os.urandom(6).hex()
    store = TicketLockStore(client, prefix, lua_dir=args.lua_dir)
    text_client = redis.Redis.from_url(args.redis, decode_responses=True)
    text_store = TicketLockStore(text_client, prefix, lua_dir=args.lua_dir)
    checks = _selftest(client, store, text_store)
    leftovers = client.keys(prefix + "*")
    if leftovers:
        raise AssertionError(f"keys left behind: {leftovers!r}")
    _emit(ok=True, checks=checks, prefix=prefix)
    return EXIT_OK


def _selftest(client: Any, store: TicketLockStore, text_store: TicketLockStore) -> int:
    """Checks the Python side against a real Redis; returns how many passed.
    ``text_store`` shares ``store``'s prefix over a client that decodes responses."""
    done = 0

    def check(condition: bool, what: str) -> None:
        nonlocal done
        if not condition:
            raise AssertionError(what)
        done += 1

    def raises(error: type[BaseException], call: Callable[[], Any], what: str) -> None:
        try:
            call()
        except error:
            check(True, what)
        else:
            raise AssertionError(f"{what}: no {error.__name__}")

    # Inputs are checked before anything is sent.
    for bad_id in ["", "x" * (MAX_CONVERSATION_ID_LEN + 1), "\ud800", None]:
        raises(ValueError, lambda: store.issue_ticket(bad_id, 1), f"id {bad_id!r:.20} rejected")
    for bad_s in [0, -1, math.nan, math.inf, MAX_LIFETIME_S + 1, True, "1"]:
        raises(ValueError, lambda: store.issue_ticket("c", bad_s), f"lifetime {bad_s!r} rejected")
        raises(ValueError, lambda: store.lock("c", wait_time_s=bad_s), f"wait time {bad_s!r} rejected")
    for bad_prefix in ["", "a:b", "a{b}", "é", "a b"]:
        raises(ValueError, lambda: TicketLockStore(client, bad_prefix), f"prefix {bad_prefix!r} rejected")
    check(
        TicketLockStore(client).keys("}a{b%") == ("lock:{%7Da%7Bb%25}", "lock:{%7Da%7Bb%25}:q", "lock:{%7Da%7Bb%25}:e"),
        "ids are percent-encoded into one hash tag",
    )
    check(store.key_prefix.endswith(":lock:"), "custom prefix becomes P:lock:")

    # A fresh conversation: served at once, visible, gone after the release.
    cid = "self {test} 100%"
    with store.lock(cid, lifetime_s=10) as held:
        check(held.ticket == 0 and held.fencing_token is not None, "first ticket is 0 and fenced")
        snapshot = store.get_lock(cid)
        check(snapshot is not None and snapshot.now_serving == 0 and snapshot.next_number == 1, "get_lock")
        check(store.is_someone_waiting(cid), "is_someone_waiting while held")
        check(held.is_held(), "is_held")
        check(0 < held.extend(20) <= 20, "extend")
    check(store.get_lock(cid) is None and not store.is_someone_waiting(cid), "released and cleaned up")

    # FIFO hand-over by wake-up: a waiter with wait_time 30 s is served at
    # once, whether the client decodes responses or not.
    for each in (store, text_store):
        holder = each.lock(cid, lifetime_s=10).acquire()
        served: dict[str, Any] = {}

        def wait() -> None:
            try:
                with each.lock(cid, lifetime_s=10, wait_time_s=30, dead_waiter_timeout_s=90) as g:
                    served["ticket"], served["at"] = g.ticket, time.monotonic()
            except BaseException as e:  # reported by the main thread
                served["error"] = e

        waiter = threading.Thread(target=wait)
        waiter.start()
        _until(lambda: client.pubsub_numsub(store.keys(cid)[0])[0][1] >= 1, "waiter subscribed")
        time.sleep(0.2)
        released_at = time.monotonic()
        holder.release()
        waiter.join(10)
        check("error" not in served and served.get("ticket") == holder.ticket + 1, f"waiter served: {served}")
        check(served["at"] - released_at < 2.0, f"hand-over took {served['at'] - released_at:.3f}s")
        check(store.get_lock(cid) is None, "nothing left after the hand-over")

    # A timeout gives the ticket back.
    holder = store.lock(cid, lifetime_s=10).acquire()
    raises(LockTimeout, lambda: store.lock(cid, timeout_s=0.2).acquire(), "timeout")
    snapshot = store.get_lock(cid)
    check(snapshot is not None and [t.number for t in snapshot.tickets] == [holder.ticket], "timed-out ticket given back")
    holder.release()

    # A fixed ticket that nobody releases is passed over when it expires.
    stale = store.issue_ticket(cid, 0.3)
    began = time.monotonic()
    with store.lock(cid, wait_time_s=30, dead_waiter_timeout_s=90) as held:
        check(held.ticket == stale + 1, "served after the stale ticket")
        check(0.2 < time.monotonic() - began < 3, "expiry of the head wakes the waiter")

    # A waiting ticket removed by someone else: its waiter learns at once.
    holder = store.lock(cid, lifetime_s=10).acquire()
    outcome: dict[str, Any] = {}

    def removed() -> None:
        try:
            store.lock(cid, wait_time_s=30, dead_waiter_timeout_s=90).acquire()
            outcome["error"] = None
        except BaseException as e:
            outcome["error"], outcome["at"] = e, time.monotonic()

    waiter = threading.Thread(target=removed)
    waiter.start()
    _until(lambda: client.pubsub_numsub(store.keys(cid)[0])[0][1] >= 1, "waiter subscribed")
    time.sleep(0.2)
    removed_at = time.monotonic()
    check(store.finish_serving(cid, holder.ticket + 1), "finish_serving removes the waiting ticket")
    waiter.join(10)
    check(isinstance(outcome.get("error"), LockExpired), f"removed waiter gets LockExpired: {outcome}")
    check(outcome["at"] - removed_at < 2.0, "removed waiter learns it at once")
    holder.release()

    # A lease that ran out and was pruned (here by update_lock; any other
    # client's call does it too): leaving the block says so.
    def lose_lease() -> None:
        with store.lock(cid, lifetime_s=0.1):
            time.sleep(0.3)
            store.update_lock(cid)

    raises(LockExpired, lose_lease, "lost lease reported on exit")
    store.update_lock(cid)
    store.delete_lock(cid)

    # finish_serving keeps the record, cleanup removes it.
    ticket = store.issue_ticket(cid, 10)
    check(store.finish_serving(cid, ticket) and store.get_lock(cid) is not None, "finish keeps the record")
    check(store.delete_lock(cid) and store.get_lock(cid) is None, "delete_lock")
    ticket = store.issue_ticket(cid, 10)
    check(store.cleanup(cid, ticket) and store.get_lock(cid) is None, "cleanup removes the record")
    check(not store.cleanup(cid, ticket), "a second cleanup removes nothing")
    return done


def _until(condition: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.005)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ticketlock.py",
        description="Python client of the ticketlock Lua scripts (same queues as the Rust crate).",
        epilog="Exit codes: 0 ok, 1 lock error (timeout, expired), 2 bad arguments, 3 Redis unreachable.",
    )
    parser.add_argument("--lua-dir", default=None, help=f"the lua/ directory (default: next to this script, or ${LUA_DIR_ENV})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug log on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis", required=True, help="redis://host:port/db")
        p.add_argument("--prefix", default=None, help="alphanumeric key prefix P (keys P:lock:...)")
        p.add_argument("--conversation", required=True)
        p.add_argument("--lifetime-s", type=float, default=DEFAULT_LIFETIME_S, help="lease, from the grant")
        p.add_argument("--wait-time-s", type=float, default=DEFAULT_WAIT_TIME_S)
        p.add_argument("--timeout-s", type=float, default=None)
        p.add_argument("--dead-waiter-timeout-s", type=float, default=DEFAULT_DEAD_WAITER_TIMEOUT_S)

    contend = commands.add_parser("contend", help="N non-atomic increments under the lock; prints a JSON summary")
    store_args(contend)
    contend.add_argument("--count", type=int, required=True)
    contend.add_argument("--counter-key", required=True)
    contend.add_argument("--log-key", required=True)
    contend.add_argument("--hold-ms", type=float, default=0)
    contend.add_argument("--ready-go", action="store_true", help='print {"event":"ready"}, start at a line on stdin')
    contend.set_defaults(run=_cmd_contend)

    lock = commands.add_parser("lock", help="take the lock once; JSON events on stdout")
    store_args(lock)
    lock.add_argument("--hold-ms", type=float, default=0)
    lock.add_argument("--hold-until-stdin", action="store_true", help="release at a line on stdin")
    lock.set_defaults(run=_cmd_lock)

    scripts = commands.add_parser("scripts", help="SHA1 of every operation's code")
    scripts.set_defaults(run=_cmd_scripts)

    keys = commands.add_parser("keys", help="the KEYS of a conversation")
    keys.add_argument("--prefix", default=None)
    keys.add_argument("--conversation", required=True)
    keys.set_defaults(run=_cmd_keys)

    selftest = commands.add_parser("selftest", help="check this client against a Redis")
    selftest.add_argument("--redis", required=True)
    selftest.set_defaults(run=_cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    if redis is None and args.command != "keys":
        print("ticketlock.py: the redis module is missing: python3 -m pip install redis", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except ValueError as e:
        print(f"ticketlock.py: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TicketLockError as e:
        print(f"ticketlock.py: {e}", file=sys.stderr)
        return EXIT_LOCK
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if redis is not None and isinstance(e, redis.ConnectionError):
            print(f"ticketlock.py: Redis unreachable: {e}", file=sys.stderr)
            return EXIT_REDIS
        raise


if __name__ == "__main__":
    sys.exit(main())
